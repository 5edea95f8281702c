"""Helpers for the server tests: an in-process uvicorn server on loopback, a subprocess server, metric lookup.

Tests talk real HTTP over 127.0.0.1. The in-process server runs uvicorn in a thread (its own event loop), so tests
can patch the model it serves; the subprocess server is ``python -m trimformer serve`` (signals, CLI).
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from trimformer.serve import ServedModel, ServerConfig, build_server

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running(model: ServedModel, *, with_server: bool = False, **config):
    """Serve ``model`` with uvicorn in a thread on a free loopback port; yields ``(base_url, state)`` (plus the
    :class:`~trimformer.serve.server.DrainingServer` and its thread with ``with_server=True``)."""
    config.setdefault("tokenization_workers", 2)
    cfg = ServerConfig(host="127.0.0.1", port=0, log_level="warning", **config)
    server = build_server(model, cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{port}"
        yield (url, server.state, server, thread) if with_server else (url, server.state)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def spawned(*args: str, timeout: float = 120):
    """``python -m trimformer serve ARGS --port P`` in a subprocess; yields ``(base_url, process)`` once healthy."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimformer", "serve", "--port", str(port), *args],
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in time")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def metric(text: str, name: str, **labels) -> float:
    """Value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0
