"""Benchmark suites behind ``trimformer bench <suite>``.

Each suite module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy imports inside
``run``. Shared timing, CSV, Markdown and plotting helpers are in :mod:`trimformer.bench.common`.
"""

SUITES = {
    "embed-cpu": ("trimformer.bench.embed_cpu", "CPU embedding throughput vs sentence-transformers and HF"),
    "encoder": ("trimformer.bench.encoder", "ByteTransformer protocol: BERT-base encoder on the GPU"),
    "attention-kernel": (
        "trimformer.bench.attention_kernel",
        "varlen attention kernels: ours vs SDPA/varlen_attn/unfused",
    ),
    "attention": ("trimformer.bench.attention", "CCA/CCGQA vs MHA/GQA/MLA attention layers (paper App. D)"),
    "serve": ("trimformer.bench.serve", "HTTP embedding server under concurrent load"),
    "quality": ("trimformer.bench.quality", "small-scale LM quality comparison of attention types"),
}
