"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

On the first SIGTERM or SIGINT the server stops admitting requests (they get 503, ``/health`` turns 503 too), lets
every accepted request finish, then shuts uvicorn down and exits with status 0. A second signal, or
``shutdown_timeout`` seconds without the in-flight count reaching zero, exits at once.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import socket
import time

import uvicorn

from trimformer.serve.app import ServerState, create_app
from trimformer.serve.config import ServerConfig
from trimformer.serve.model import ServedModel

logger = logging.getLogger("trimformer.serve")


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose exit signals drain accepted requests first (and which exits 0 after a drain,
    instead of re-raising the signal as plain uvicorn does)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_deadline is not None:
            logger.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        logger.info(
            "%s: draining %d request(s) in flight, refusing new ones", signal.Signals(sig).name, self.state.in_flight
        )
        self.begin_drain()

    def begin_drain(self) -> None:
        """Stop admitting requests; exit once none is in flight (or after ``shutdown_timeout``)."""
        self.state.begin_drain()
        self._drain_deadline = time.monotonic() + self.state.config.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            if self.state.in_flight == 0:
                self.should_exit = True
            elif time.monotonic() > self._drain_deadline:
                logger.warning("shutdown timeout: %d request(s) still in flight are dropped", self.state.in_flight)
                self.should_exit = self.force_exit = True  # uvicorn would otherwise wait for their connections
        return await super().on_tick(counter)


def fast_io() -> tuple[str, str]:
    """uvicorn's ``(loop, http)``: uvloop and httptools when installed, else asyncio and h11."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return loop, http


def build_server(model: ServedModel, config: ServerConfig, **uvicorn_kwargs) -> DrainingServer:
    """A :class:`DrainingServer` for ``model`` (not started). Extra keyword arguments go to ``uvicorn.Config``."""
    app = create_app(model, config)
    loop, http = fast_io()
    kwargs = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "access_log": config.access_log,
        "lifespan": "on",
        "timeout_keep_alive": 30,
        "loop": loop,
        "http": http,
        # X-Forwarded-For only changes the client address of access-log lines; parsing it costs every request
        "proxy_headers": config.access_log,
        "server_header": False,
    }
    kwargs.update(uvicorn_kwargs)
    return DrainingServer(uvicorn.Config(app, **kwargs), app.state.server)


def setup_logging(level: str) -> None:
    """Send ``trimformer.*`` log records to stderr in uvicorn's format (once)."""
    log = logging.getLogger("trimformer")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def run_server(config: ServerConfig, *, sock: socket.socket | None = None) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, return the exit status (0 after a clean drain)."""
    setup_logging(config.log_level)
    model = ServedModel.load(
        config.model, device=config.device, dtype=config.dtype, model_id=config.model_id, cuda_graphs=config.cuda_graphs
    )
    enc = model.encoder
    logger.info(
        "trimformer %s model %s (%s, %s, %s) on http://%s:%d (%s loop, %s parser)",
        model.kind,
        model.model_id,
        enc.model_type,
        str(enc.dtype).removeprefix("torch."),
        enc.device,
        config.host,
        config.port,
        *fast_io(),
    )
    server = build_server(model, config)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1
