"""Server settings: one dataclass shared by ``trimformer serve``, :func:`~trimformer.serve.app.create_app` and tests."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

#: Environment variable read when ``--api-key`` is not given (keeps the key out of ``ps`` listings).
API_KEY_ENV = "TRIMFORMER_API_KEY"


def default_tokenization_workers() -> int:
    """Threads of the tokenizer stage: one. Each call tokenizes every waiting request's texts at once (the Rust
    tokenizer parallelises a batch by itself); a second thread only splits those batches and contends for the GIL
    with the event loop (measured: 3,135 vs 2,459 single-text requests/s at 64 clients on 2 cores)."""
    return 1


@dataclass
class ServerConfig:
    """Settings of one embedding server.

    Attributes:
        model: local model folder; ``None`` is the packaged all-MiniLM-L6-v2.
        host, port: where to listen (``127.0.0.1`` unless told otherwise).
        device, dtype: as in :meth:`trimformer.Encoder.from_pretrained` (``None`` picks by machine).
        max_batch_tokens: token budget of one model batch (valid tokens; no padding).
        max_concurrent_requests: requests admitted at once; one more gets 429 with ``Retry-After``.
        max_client_batch_size: most inputs in one request; more gets 413.
        payload_limit: most bytes in one request body; more gets 413 (TEI's default, 2 MB).
        truncate: default for over-long inputs: cut them to the model's limit (True) or answer 413 (False).
        api_key: when set, every endpoint but ``GET /health`` needs ``Authorization: Bearer <api_key>``.
        model_id: the name reported in responses and ``/info`` (default: the folder name).
        tokenization_workers: tokenizer-stage threads (default: :func:`default_tokenization_workers`).
        shutdown_timeout: seconds to wait for accepted requests after SIGTERM before exiting anyway.
        workers: server processes sharing the listening socket, each with its own copy of the model, tokenizer
            stage and batcher (one event loop per process lifts the per-request Python ceiling of one process);
            limits, ``/metrics`` and ``/info`` are per worker.
        retry_after: seconds sent in ``Retry-After`` with 429 and 503 answers.
        cuda_graphs: on a GPU, replay CUDA graphs for model batches (the engine's default).
        access_log: log every request (uvicorn's access log).
        log_level: uvicorn log level.
    """

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    device: str | None = None
    dtype: str | None = None
    max_batch_tokens: int = 16384
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 256
    payload_limit: int = 2_000_000
    truncate: bool = False
    api_key: str | None = None
    model_id: str | None = None
    tokenization_workers: int | None = None
    shutdown_timeout: float = 30.0
    workers: int = 1
    retry_after: int = 1
    cuda_graphs: bool = True
    access_log: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        positive = ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size", "payload_limit", "workers")
        for name in (*positive, "retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.tokenization_workers is None:
            self.tokenization_workers = default_tokenization_workers()
        if self.tokenization_workers <= 0:
            raise ValueError(f"tokenization-workers must be positive, got {self.tokenization_workers}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api-key must not be empty")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """Settings from the options added by :func:`add_arguments` (the API key falls back to
        ``$TRIMFORMER_API_KEY``)."""
        return cls(
            model=args.model,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            max_batch_tokens=args.max_batch_tokens,
            max_concurrent_requests=args.max_concurrent_requests,
            max_client_batch_size=args.max_client_batch_size,
            payload_limit=args.payload_limit,
            truncate=args.truncate,
            api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None,
            model_id=args.model_id,
            tokenization_workers=args.tokenization_workers,
            shutdown_timeout=args.shutdown_timeout,
            workers=args.workers,
            cuda_graphs=args.cuda_graphs,
            access_log=args.access_log,
            log_level=args.log_level,
        )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``trimformer serve`` (defaults as in :class:`ServerConfig`)."""
    d = ServerConfig.__dataclass_fields__
    parser.add_argument(
        "--model", default=None, metavar="PATH", help="local HF model folder (default: all-MiniLM-L6-v2)"
    )
    parser.add_argument("--host", default=d["host"].default, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=d["port"].default, help="port (default 8080)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32/fp32, float16/fp16, bfloat16/bf16 (default: by device)")
    parser.add_argument(
        "--max-batch-tokens", type=_positive_int, default=16384, metavar="N", help="tokens per model batch (16384)"
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=_positive_int,
        default=512,
        metavar="N",
        help="requests admitted at once; more get 429 (512)",
    )
    parser.add_argument(
        "--max-client-batch-size", type=_positive_int, default=256, metavar="N", help="inputs per request (256)"
    )
    parser.add_argument(
        "--payload-limit", type=_positive_int, default=2_000_000, metavar="BYTES", help="request body size (2 MB)"
    )
    trunc = parser.add_mutually_exclusive_group()
    trunc.add_argument(
        "--truncate", dest="truncate", action="store_true", default=False, help="cut over-long inputs to the limit"
    )
    trunc.add_argument(
        "--no-truncate", dest="truncate", action="store_false", help="answer 413 to over-long inputs (default)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--model-id", default=None, help="model name reported by the API (default: folder name)")
    parser.add_argument(
        "--tokenization-workers", type=_positive_int, default=None, metavar="N", help="tokenizer-stage threads (1)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="after SIGTERM, wait at most S seconds for accepted requests (30)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="server processes on one socket, each with its own model copy; limits and /metrics per worker (1)",
    )
    parser.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="run every GPU forward eagerly"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"), help="(info)"
    )
