"""`trimformer embed` through a subprocess: outputs, summary line, and a one-line error for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "trimformer" / "data" / "sample_corpus.txt"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = "1"  # several CLI processes run at once on a 2-core CI machine
    return env


# The CLI with F.linear failing as it does where a device lacks kernels for a dtype (e.g. fp16 GEMMs on old CPUs).
_NO_HALF = (
    "import sys, torch, torch.nn.functional as F\n"
    "def linear(x, *a, **k):\n"
    "    if x.dtype == torch.float16: raise RuntimeError(\"'addmm_impl_cpu_' not implemented for 'Half'\")\n"
    "F.linear = linear\n"
    "from trimformer.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


def _start(args, stdin=None):
    if args[0] == "--no-half":
        cmd = [sys.executable, "-c", _NO_HALF, *args[1:]]
    else:
        cmd = [sys.executable, "-m", "trimformer", *args]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=ROOT,
    )


def _run_all(cases):
    """Run several CLI invocations concurrently: ``{name: (args, stdin)} -> {name: (rc, stdout, stderr)}``."""
    procs = {name: (_start(args, stdin), stdin) for name, (args, stdin) in cases.items()}
    out = {}
    for name, (proc, stdin) in procs.items():
        stdout, stderr = proc.communicate(stdin, timeout=300)
        out[name] = (proc.returncode, stdout, stderr.decode("utf-8", "replace"))
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference():
    from trimformer import Encoder

    enc = Encoder.from_pretrained(device="cpu", dtype="float32")
    return enc, enc.embed(CORPUS.read_text(encoding="utf-8").splitlines())


def test_help_and_version():
    res = _run_all({"help": (["--help"], None), "version": (["--version"], None), "ehelp": (["embed", "--help"], None)})
    from trimformer import __version__

    assert res["help"][0] == 0 and b"embed" in res["help"][1]
    assert res["version"][0] == 0 and res["version"][1].decode().strip() == f"trimformer {__version__}"
    assert res["ehelp"][0] == 0 and b"--batch-tokens" in res["ehelp"][1]


def test_embed_outputs(tmp_path, reference):
    enc, ref = reference
    lines = ["A man is eating food.", "", " ".join(["long"] * 400), "Die Katze schläft."]
    infile = tmp_path / "in.txt"
    infile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = _run_all(
        {
            "default": (["embed", "--device", "cpu", "-q"], None),
            "npy": (["embed", str(infile), "--output", str(tmp_path / "v.npy"), "--device", "cpu"], None),
            "stdin": (["embed", "-", "--format", "jsonl", "-o", str(tmp_path / "v.jsonl"), "--device", "cpu"], b"x\n"),
        }
    )
    rc, stdout, stderr = res["default"]
    assert rc == 0, stderr
    rows = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [r["index"] for r in rows] == list(range(100))
    got = torch.tensor([r["embedding"] for r in rows])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    summary = stderr.strip().splitlines()[-1]
    assert summary.startswith("embedded 100 texts from the bundled sample corpus (")
    for part in ("tokens/s", "on cpu", "float32"):
        assert part in summary

    rc, _, stderr = res["npy"]
    assert rc == 0, stderr
    arr = np.load(tmp_path / "v.npy")
    assert arr.shape == (4, 384) and arr.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(arr), enc.embed(lines), rtol=0, atol=1e-5)
    assert "1 truncated to 256 tokens" in stderr and "100%" in stderr  # progress bar on stderr

    rc, _, stderr = res["stdin"]
    assert rc == 0, stderr
    rows = (tmp_path / "v.jsonl").read_text().splitlines()
    assert len(rows) == 1 and "from stdin" in stderr
    torch.testing.assert_close(torch.tensor([json.loads(rows[0])["embedding"]]), enc.embed(["x"]), rtol=0, atol=1e-6)


def test_bad_inputs_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n\n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("fine\ncaf\xe9 au lait\n".encode("latin-1"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    nope = str(tmp_path / "nope.txt")
    cases = {
        "missing": (["embed", nope], f"input file '{nope}' does not exist"),
        "empty": (["embed", str(empty)], "is empty"),
        "blank": (["embed", str(blank)], "has no text, only empty lines"),
        "utf8": (["embed", str(latin)], "line 2 is not valid UTF-8 (byte 0xe9 at column 4)"),
        "stdin-empty": (["embed", "-"], "input stdin is empty"),
        "npy-stdout": (["embed", "--format", "npy"], "--format npy needs --output FILE"),
        "format": (["embed", "--format", "csv"], "unknown --format 'csv'"),
        "budget": (["embed", "--batch-tokens", "0"], "--batch-tokens must be a positive integer"),
        "folder": (["embed", "--model", str(tmp_path / "no-model")], "does not exist"),
        "model-type": (["embed", "--model", str(gpt2)], "unsupported model_type 'gpt2'; supported: albert, bert"),
        "dtype": (["embed", "--device", "cpu", "--dtype", "float8"], "unknown dtype 'float8'"),
        "no-half": (
            ["--no-half", "embed", "--device", "cpu", "--dtype", "fp16"],
            "dtype torch.float16 cannot run on cpu: 'addmm_impl_cpu_' not implemented for 'Half'",
        ),
    }
    if not torch.cuda.is_available():
        cases["cuda"] = (["embed", "--device", "cuda"], "CUDA is not available")
    res = _run_all({name: (args, b"" if "-" in args else None) for name, (args, _) in cases.items()})
    for name, (rc, stdout, stderr) in res.items():
        lines = stderr.strip().splitlines()
        assert rc != 0, f"{name}: exit 0"
        assert len(lines) == 1, f"{name}: {stderr!r}"
        assert lines[0].startswith("trimformer embed: error: "), f"{name}: {lines[0]!r}"
        assert cases[name][1] in lines[0], f"{name}: {lines[0]!r}"
        assert stdout == b"", name
