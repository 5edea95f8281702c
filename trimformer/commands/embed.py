"""``trimformer embed``: embed one text per line with a padding-free encoder.

    trimformer embed                                 # the bundled sample corpus, JSON lines on stdout
    trimformer embed texts.txt --output vecs.npy     # float32 [N, H] array
    cat texts.txt | trimformer embed - --format jsonl --output vecs.jsonl

Empty lines are embedded as the model's special tokens alone (as sentence-transformers does); texts longer than the
model's limit are truncated and counted in the summary line printed on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

FORMATS = ("npy", "jsonl")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed texts (one per line) with a padding-free encoder",
        description="Embed one text per line. Without INPUT, embeds a small bundled sample corpus.",
    )
    p.add_argument("input", nargs="?", default=None, metavar="INPUT", help="text file, one text per line; - for stdin")
    p.add_argument("--model", default=None, metavar="PATH", help="local HF model folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="output file (default: JSON lines on stdout)")
    p.add_argument("--format", default=None, metavar="{npy,jsonl}", help="output format (default: from the suffix)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32/fp32, float16/fp16, bfloat16/bf16 (default: by device)")
    p.add_argument("--batch-tokens", default="16384", metavar="N", help="token budget per batch (default 16384)")
    p.add_argument("--pooling", default=None, help="cls, mean, max, last, mean_sqrt_len (default: from the model)")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None, help="L2-normalise")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false", help="do not L2-normalise")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def read_texts(source: str | None) -> tuple[list[str], str]:
    """Texts (one per line) and a display name. ``None`` is the bundled corpus, ``"-"`` is stdin.

    Raises:
        ValueError: missing file, a folder, an empty or blank input, or a line that is not UTF-8 (named by number).
    """
    if source is None:
        path = Path(__file__).resolve().parents[1] / "data" / "sample_corpus.txt"
        data, name = path.read_bytes(), "the bundled sample corpus"
    elif source == "-":
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"input file '{source}' does not exist")
        if path.is_dir():
            raise ValueError(f"input '{source}' is a directory, expected a text file with one text per line")
        data, name = path.read_bytes(), f"'{source}'"
    if not data:
        raise ValueError(f"input {name} is empty (expected one text per line)")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    texts = []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
            raise ValueError(f"input {name}: line {number} is not valid UTF-8 ({bad})") from None
        texts.append(text.removesuffix("\r"))
    if texts and texts[0].startswith("\ufeff"):  # a UTF-8 byte-order mark is not part of the first text
        texts[0] = texts[0][1:]
    if not any(t.strip() for t in texts):
        raise ValueError(f"input {name} has no text, only empty lines (expected one text per line)")
    return texts, name


def _output_format(fmt: str | None, output: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown --format {fmt!r}; use npy or jsonl")
        if fmt == "npy" and output is None:
            raise ValueError("--format npy needs --output FILE (npy is binary; stdout gets jsonl)")
        return fmt
    if output is None:
        return "jsonl"
    return "jsonl" if Path(output).suffix.lower() in (".jsonl", ".json", ".ndjson") else "npy"


def _batch_tokens(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--batch-tokens must be a positive integer, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"--batch-tokens must be a positive integer, got {value!r}")
    return n


def _write_jsonl(fh, vectors) -> None:
    for i, row in enumerate(vectors.tolist()):
        values = ",".join(f"{v:.9g}" for v in row)
        fh.write(f'{{"index": {i}, "embedding": [{values}]}}\n')


def run(args: argparse.Namespace) -> int:
    fmt = _output_format(args.format, args.output)
    batch_tokens = _batch_tokens(args.batch_tokens)
    if args.output is not None and Path(args.output).is_dir():
        raise ValueError(f"--output '{args.output}' is a directory, expected a file path")
    texts, name = read_texts(args.input)

    from trimformer.engine.encoder import Encoder

    enc = Encoder.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    _ = enc.tokenizer  # load it before the clock starts
    start = time.perf_counter()
    tokens = enc.tokenize(texts)
    vectors = enc.embed_token_ids(
        tokens.input_ids,
        pooling=args.pooling,
        normalize=args.normalize,
        batch_tokens=batch_tokens,
        show_progress=not args.quiet,
    )
    elapsed = time.perf_counter() - start

    if fmt == "npy":
        import numpy as np

        with open(args.output, "wb") as fh:
            np.save(fh, vectors.numpy())
    elif args.output is None:
        try:
            _write_jsonl(sys.stdout, vectors)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. `| head`: the reader left, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            _write_jsonl(fh, vectors)

    dtype = str(enc.dtype).removeprefix("torch.")
    truncated = f", {tokens.num_truncated} truncated to {enc.max_length} tokens" if tokens.num_truncated else ""
    where = args.output if args.output is not None else "stdout"
    print(
        f"embedded {len(texts)} texts from {name} ({tokens.num_tokens} tokens{truncated}) in {elapsed:.2f} s: "
        f"{tokens.num_tokens / max(elapsed, 1e-9):,.0f} tokens/s on {enc.device}, {dtype}, "
        f"{vectors.shape[1]}-dim ({fmt}) -> {where}",
        file=sys.stderr,
    )
    return 0
