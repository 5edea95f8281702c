"""The CLI's parser must not pull in optional heavy stacks: GPU boxes that run benchmarks may lack FastAPI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
from trimformer import cli
try:
    cli.main(["bench", "--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
heavy = sorted(m for m in ("fastapi", "uvicorn", "starlette") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


def test_cli_parser_does_not_import_the_http_stack():
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, f"building the CLI parser imported {out.stdout.split('HEAVY=')[-1].strip()}"
