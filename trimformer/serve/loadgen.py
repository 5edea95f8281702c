"""A load generator for the embedding server: keep-alive HTTP/1.1 clients on asyncio streams, spread over processes.

Used by ``trimformer bench serve``. Only the standard library: it runs wherever the bench runs. Each client sends
back-to-back pre-serialised requests on its own connection; :class:`LoadGenerator` splits the clients over
processes (one event loop each) so that at high request rates it measures the server rather than itself, and
reports its own CPU use; :func:`cpu_seconds` reads a server process's (Linux ``/proc``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path


def request_bytes(host: str, texts: list[str], fmt: str) -> bytes:
    """One complete ``POST /v1/embeddings`` HTTP/1.1 request for ``texts`` (``encoding_format`` ``fmt``)."""
    body = json.dumps({"input": texts, "model": "m", "encoding_format": fmt}).encode()
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def load(
    url: str,
    requests: list[bytes],
    sizes: list[int],
    tokens: list[int],
    concurrency: int,
    seconds: float,
    start_at: float | None = None,
    first: int = 0,
) -> dict:
    """``concurrency`` keep-alive connections send back-to-back requests for ``seconds`` from ``start_at``
    (``time.monotonic()``, shared by every client process; default: now), starting at request ``first``.

    Returns ``{"texts", "tokens", "latencies", "errors", "first_send", "last_answer", "cpu"}`` (monotonic times,
    this process's CPU seconds); an answer counts when its status is 200 and it holds one embedding per text. The
    client is plain asyncio streams: measured here, one ``httpx.AsyncClient`` (or one per connection) collapses at
    64+ connections (86 req/s on ``/health`` at 64 connections on a 2-core machine where these streams did 2,283),
    so httpx would measure itself rather than the server.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    counter = iter(range(first, 10**12))
    latencies: list[float] = []
    done = {"texts": 0, "tokens": 0, "errors": 0, "last": 0.0}
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    start = time.monotonic()
    deadline = start + seconds
    cpu0 = time.process_time()

    async def client(reader, writer) -> None:
        try:
            while time.monotonic() < deadline:
                k = next(counter) % len(requests)
                t0 = time.monotonic()
                writer.write(requests[k])
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                t1 = time.monotonic()
                latencies.append(t1 - t0)
                done["last"] = max(done["last"], t1)
                if head[9:12] == b"200" and body.count(b'"object":"embedding"') == sizes[k]:
                    done["texts"] += sizes[k]
                    done["tokens"] += tokens[k]
                else:
                    done["errors"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(client(r, w) for r, w in conns))
    return {
        "texts": done["texts"], "tokens": done["tokens"], "latencies": latencies, "errors": done["errors"],
        "first_send": start, "last_answer": max(done["last"], start), "cpu": time.process_time() - cpu0,
    }  # fmt: skip


def client_main(conn) -> None:
    """A client process: ``("requests", reqs, sizes, tokens)`` stores the workload, ``("run", url, clients,
    seconds, start_at, first)`` answers with :func:`load`'s dict (or ``{"error": text}``), ``None`` ends it."""
    reqs = sizes = tokens = None
    while (msg := conn.recv()) is not None:
        if msg[0] == "requests":
            reqs, sizes, tokens = msg[1:]
            continue
        _, url, clients, seconds, start_at, first = msg
        try:
            conn.send(asyncio.run(load(url, reqs, sizes, tokens, clients, seconds, start_at, first)))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


class LoadGenerator:
    """Clients spread over ``procs`` processes (one asyncio event loop each), so that at high request rates the
    load generator does not measure itself; ``procs == 1`` runs in this process."""

    def __init__(self, procs: int) -> None:
        import multiprocessing as mp

        self.procs = procs
        self._workers = []
        if procs > 1:
            ctx = mp.get_context("spawn")  # the bench process holds torch threads: no fork
            for _ in range(procs):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=client_main, args=(child,), daemon=True)
                proc.start()
                self._workers.append((proc, parent))

    def set_requests(self, reqs: list[bytes], sizes: list[int], tokens: list[int]) -> None:
        """The workload of the next points: request bytes, texts and tokens per request."""
        self._reqs, self._sizes, self._tokens = reqs, sizes, tokens
        for _, conn in self._workers:
            conn.send(("requests", reqs, sizes, tokens))

    def run(self, url: str, concurrency: int, seconds: float) -> dict:
        """One point: ``{"texts", "tokens", "wall", "latencies", "errors", "client_cpu"}`` (``wall``: first send
        to last answer over all processes; ``client_cpu``: CPU seconds of the client processes)."""
        if not self._workers:
            parts = [asyncio.run(load(url, self._reqs, self._sizes, self._tokens, concurrency, seconds))]
        else:
            share = [concurrency // self.procs + (i < concurrency % self.procs) for i in range(self.procs)]
            start_at = time.monotonic() + 0.3 + 0.002 * concurrency  # after every process has connected
            active = []
            for i, ((_, conn), n) in enumerate(zip(self._workers, share)):
                if n:
                    first = i * len(self._reqs) // self.procs
                    conn.send(("run", url, n, seconds, start_at, first))
                    active.append(conn)
            parts = [conn.recv() for conn in active]
            failed = [p["error"] for p in parts if "error" in p]
            if failed:
                raise ValueError(f"a client process failed: {failed[0]}")
        return {
            "texts": sum(p["texts"] for p in parts),
            "tokens": sum(p["tokens"] for p in parts),
            "wall": max(p["last_answer"] for p in parts) - min(p["first_send"] for p in parts),
            "latencies": [x for p in parts for x in p["latencies"]],
            "errors": sum(p["errors"] for p in parts),
            "client_cpu": sum(p["cpu"] for p in parts),
        }

    def close(self) -> None:
        """End the client processes."""
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid``, its threads and its child processes (``--workers``) (Linux
    ``/proc``; ``None`` elsewhere)."""
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None
