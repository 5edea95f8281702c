"""`trimformer attention-info`: the side-by-side table and its JSON form."""

import json

from trimformer.cli import main


def run(capsys, *argv):
    code = main(["attention-info", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_table_is_the_paper_setup(capsys):
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert "E=2048" in lines[0] and "S=16384" in lines[0] and "bf16" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert list(rows) == ["MHA", "GQA-4", "MLA-2x/2x", "CCA-4x", "CCGQA-2x/8x"]
    assert rows["CCGQA-2x/8x"][1:3] == ["8/2", "5,575,682"]
    assert rows["CCGQA-2x/8x"][-3:] == ["1,024", "8.00", "5,376"]  # KV bytes/token, vs MHA, state bytes
    assert rows["MHA"][2] == "16,777,216" and rows["MHA"][-3] == "8,192"
    assert rows["CCA-4x"][5] == "4.00" and rows["CCGQA-2x/8x"][5] == "2.16"  # Table II ratios at 16k


def test_json_follows_the_options(capsys):
    code, out, _ = run(
        capsys,
        "--format",
        "json",
        "--hidden-size",
        "1024",
        "--heads",
        "8",
        "--seq-len",
        "2048",
        "--dtype",
        "fp32",
        "--ccgqa",
        "1",
        "4",
        "--gqa-groups",
        "2",
        "--conv-kernels",
        "3",
        "2",
    )
    assert code == 0
    data = json.loads(out)
    layers = {row["name"]: row for row in data["layers"]}
    assert (data["seq_len"], data["dtype"]) == (2048, "fp32")
    ccgqa = layers["CCGQA-1x/4x"]
    assert (ccgqa["config"]["num_heads"], ccgqa["config"]["num_kv_heads"], ccgqa["config"]["head_dim"]) == (8, 2, 128)
    assert ccgqa["config"]["conv_kernel_seq"] == 3
    assert ccgqa["kv_bytes_per_token"] == 2 * 2 * 128 * 4
    assert layers["GQA-2"]["kv_compression_vs_mha"] == 2.0
    assert layers["MHA"]["params"] == 4 * 1024 * 1024


def test_bad_options_exit_2_with_one_line(capsys):
    for argv in (["--dtype", "int3"], ["--ccgqa", "8", "2"], ["--heads", "12"], ["--seq-len", "0"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == ""
        assert err.startswith("trimformer attention-info: error:") and err.count("\n") == 1, err
