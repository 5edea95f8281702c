"""Causal-LM training: byte/HF tokenizers, offline corpora with packed documents, the loop, checkpoints, DDP/FSDP2.

Entry points: ``trimformer train --config CONFIG.yaml`` (see :mod:`trimformer.commands.train`) or::

    from trimformer.train import Trainer, load_config
    result = Trainer(load_config("trimformer/data/train_tiny_cpu.yaml")).train()
"""

from trimformer.train.config import DataConfig, RunConfig, TrainConfig, load_config
from trimformer.train.data import BlockStream, PackedDocs, TokenizedSplit, tokenize_corpus
from trimformer.train.loop import Trainer, TrainResult, build_model_config
from trimformer.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "BlockStream",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "PackedDocs",
    "RunConfig",
    "TokenizedSplit",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_model_config",
    "load_config",
    "load_tokenizer",
    "tokenize_corpus",
]
