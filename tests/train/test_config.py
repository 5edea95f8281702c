"""Run configs: YAML with 1e-3 floats, dotted overrides, validation, and the bundled example configs."""

from pathlib import Path

import pytest

from trimformer.commands.train import resolve_config_path
from trimformer.train import RunConfig, build_model_config, load_config
from trimformer.train.config import apply_overrides
from trimformer.train.tokenizer import ByteTokenizer


def test_overrides_and_scientific_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden_size: 64}\ntrain: {lr: 3e-3, betas: [0.9, 0.99]}\n")
    cfg = load_config(path, ["train.lr=1e-4", "model.attention.kind=gqa", "data.seq_len=256", "train.max_tokens=2e6"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model == {"hidden_size": 64, "attention": {"kind": "gqa"}}
    assert cfg.data.seq_len == 256 and cfg.train.betas == [0.9, 0.99] and cfg.train.max_tokens == 2_000_000
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.precision=fp16"], "precision"),
        (["train.micro_batch_size=0"], "micro_batch_size"),
        (["train.betas=[0.9]"], "betas"),
        (["data.seq_len=1"], "seq_len"),
        (["train.max_tokens=1.5"], "max_tokens"),
        (["bogus.key=1"], "unknown config sections"),
        (["lr=1"], "needs a section"),
        (["train.lr"], "section.key=value"),
    ],
)
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_apply_overrides_refuses_to_descend_into_a_value():
    with pytest.raises(ValueError, match="not a mapping"):
        apply_overrides({"model": {"hidden_size": 8}}, ["model.hidden_size.x=1"])


@pytest.mark.parametrize("name", ["train_tiny_cpu", "train_gpu_30m", "quality"])
def test_bundled_configs_build_models(name):
    cfg = load_config(resolve_config_path(name))
    model = build_model_config(cfg.model, ByteTokenizer())
    assert model.vocab_size == 320 and model.bos_token_id == 256
    if "match_params" in cfg.model:
        from trimformer.models.lm import model_params

        assert abs(model_params(model) - cfg.model["match_params"]) < 0.01 * cfg.model["match_params"]
    assert Path(resolve_config_path(name)).parent.name == "data"
