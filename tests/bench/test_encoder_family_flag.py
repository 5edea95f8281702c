"""`trimformer bench encoder --family ...` hands the run to the encoder-families module with the right options."""

from __future__ import annotations

import argparse

import pytest

from trimformer.bench import encoder, encoder_families


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    encoder.add_arguments(parser)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def test_family_flag_dispatches_with_overrides(monkeypatch):
    seen = {}
    monkeypatch.setattr(encoder_families, "run", lambda a: seen.setdefault("args", a) and 0)
    rc = encoder.run(_parse(["--family", "modernbert", "--seqs", "256", "--dtypes", "bfloat16", "--out", "/tmp/x"]))
    a = seen["args"]
    assert rc == 0
    assert (a.family, a.seqs, a.dtype, a.out) == ("modernbert", "256", "bfloat16", "/tmp/x")
    # options left at the BERT suite's defaults keep the family module's own defaults
    assert a.batches == "1,16" and a.providers == ",".join(encoder_families.PROVIDERS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "gpt2"], "unknown --family"),
        (["--family", "deberta-v2", "--dtypes", "bfloat16,float16"], "runs one dtype"),
    ],
)
def test_family_flag_rejects_bad_values(argv, message):
    with pytest.raises(ValueError, match=message):
        encoder.run(_parse(argv))
