"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

On the first SIGTERM or SIGINT the server stops admitting requests (they get 503, ``/health`` turns 503 too), lets
every accepted request finish, then shuts uvicorn down and exits with status 0. A second signal, or
``shutdown_timeout`` seconds without the in-flight count reaching zero, exits at once.

With ``workers > 1`` this process binds the socket and supervises that many worker processes (spawned, each in
its own process group, each loading the model and serving the shared socket); it forwards SIGTERM/SIGINT to them
as SIGTERM (so each drains) and exits 0 when all of them did.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import sys
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
    """Load the model, serve until SIGTERM/SIGINT, drain, return the exit status (0 after a clean drain); with
    ``config.workers > 1``, supervise that many worker processes instead (see the module docstring)."""
    setup_logging(config.log_level)
    if config.workers > 1:
        return _supervise(config, sock)
    return _serve(config, sock)


def _serve(config: ServerConfig, sock: socket.socket | None) -> int:
    """One server process: load the model, serve, drain (``config.workers`` is only reported in ``/info``)."""
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


def _bind(config: ServerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(2048)  # connections made while the workers load queue here instead of being refused
    return sock


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (a killed supervisor leaves no workers)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker(config: ServerConfig, sock: socket.socket) -> None:
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which forwards one SIGTERM
    _die_with_parent()
    setup_logging(config.log_level)
    raise SystemExit(_serve(config, sock))


def _supervise(config: ServerConfig, sock: socket.socket | None) -> int:
    import multiprocessing as mp

    from trimformer.models.encoders.loading import read_config

    if config.model is not None:
        read_config(config.model)  # a bad folder is one clear error here, not a traceback per worker
    mp.allow_connection_pickling()
    sock = sock or _bind(config)
    ctx = mp.get_context("spawn")  # each worker initialises its own CUDA context
    procs = [
        ctx.Process(target=_worker, args=(config, sock), name=f"trimformer-worker-{i}") for i in range(config.workers)
    ]
    for proc in procs:
        proc.start()
    logger.info("%d worker processes on http://%s:%d", len(procs), config.host, config.port)

    draining = []

    def stop_all() -> None:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def forward(sig: int, frame) -> None:
        logger.info("%s: draining the workers", signal.Signals(sig).name)
        draining.append(sig)
        stop_all()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(proc.is_alive() for proc in procs):
            if not draining and any(proc.exitcode is not None for proc in procs):
                logger.error("a worker exited unasked; stopping the others")
                draining.append(None)
                stop_all()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [proc.exitcode for proc in procs]
    if any(codes) or None in draining:
        logger.error("worker exit codes: %s", codes)
        return 1
    return 0
