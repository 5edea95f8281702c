"""``trimformer serve``: an OpenAI- and TEI-compatible embedding server (see :mod:`trimformer.serve`).

trimformer serve                                   # all-MiniLM-L6-v2 on http://127.0.0.1:8080
trimformer serve --model ./bge-small --device cuda --dtype fp16 --port 9000 --api-key $KEY
curl -s localhost:8080/v1/embeddings -H 'content-type: application/json' -d '{"input": ["hello"]}'
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from trimformer.serve.config import add_arguments

    p = subparsers.add_parser(
        "serve",
        help="serve embeddings, reranking and classification over HTTP (OpenAI- and TEI-compatible)",
        description=(
            "Serve a local encoder over HTTP: POST /v1/embeddings (OpenAI), /embed, /rerank, /predict (TEI), "
            "GET /health, /info, /metrics. Binds to 127.0.0.1 unless --host says otherwise. SIGTERM drains "
            "accepted requests and exits 0."
        ),
    )
    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trimformer.serve.config import ServerConfig
    from trimformer.serve.server import run_server

    return run_server(ServerConfig.from_args(args))
