"""``trimformer attention-info``: parameters, FLOPs and KV-cache bytes of MHA, GQA, MLA, CCA and CCGQA side by side.

Defaults are the paper's E = 2048 comparison (``cca-spec.md`` sections 3 and 5): 16 heads of 128, GQA with 4 query
heads per kv head, MLA with ``kv_lora_rank = E/2`` and ``q_lora_rank = E/2`` (RoPE dims 64), CCA-4x, CCGQA-2x/8x
(ZAYA1's attention), conv kernels 2 and 2, sequence length 16,384, batch 1, bf16 cache. Example::

    trimformer attention-info --hidden-size 2048 --heads 16 --cca-compression 4 --ccgqa 2 8 --seq-len 16384

FLOP conventions (see ``trimformer.layers.accounting``): 2 x multiply-adds of matmuls and convolutions; forward
attention over the full ``S x S`` scores; decode is one token per sequence over ``--seq-len`` cached tokens.
"""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "attention-info",
        help="parameters, FLOPs and KV-cache bytes of MHA/GQA/MLA/CCA/CCGQA side by side",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--hidden-size", type=int, default=2048, help="residual width E (default 2048)")
    p.add_argument("--heads", type=int, default=16, help="heads of the uncompressed MHA reference (default 16)")
    p.add_argument("--head-dim", type=int, default=None, help="per-head dim, kept by every method (default E/heads)")
    p.add_argument("--gqa-groups", type=int, default=4, help="GQA query heads per kv head (default 4)")
    p.add_argument("--mla-kv-compression", type=int, default=2, help="MLA c_kv: kv_lora_rank = E/c_kv (default 2)")
    p.add_argument(
        "--mla-q-compression", type=int, default=2, help="MLA c_q: q_lora_rank = E/c_q, 1 = full-rank (default 2)"
    )
    p.add_argument("--mla-rope-dim", type=int, default=None, help="MLA decoupled RoPE dims (default head_dim/2)")
    p.add_argument("--cca-compression", type=int, default=4, help="CCA compression C: heads/C latent heads (default 4)")
    p.add_argument(
        "--ccgqa", type=int, nargs=2, default=(2, 8), metavar=("C1", "C2"),
        help="CCGQA query and kv compressions (default 2 8)",
    )  # fmt: skip
    p.add_argument(
        "--conv-kernels", type=int, nargs=2, default=(2, 2), metavar=("K_SEQ", "K_CH"),
        help="CCA conv kernel sizes (default 2 2, as ZAYA1)",
    )  # fmt: skip
    p.add_argument("--seq-len", type=int, default=16384, help="sequence length / decode context (default 16384)")
    p.add_argument("--batch", type=int, default=1, help="batch size for the FLOP counts (default 1)")
    p.add_argument("--dtype", default="bf16", help="cache dtype: fp32, bf16, fp16 or fp8 (default bf16)")
    p.add_argument("--bias", action="store_true", help="count biases on the linear projections")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    p.set_defaults(run=run)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def run(args) -> int:
    from trimformer.layers.accounting import attention_cost, dtype_bytes, paper_configs

    dtype_bytes(args.dtype)
    for name in ("hidden_size", "heads", "seq_len", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    configs = paper_configs(
        args.hidden_size,
        args.heads,
        args.head_dim,
        gqa_groups=args.gqa_groups,
        mla_kv_compression=args.mla_kv_compression,
        mla_q_compression=args.mla_q_compression,
        mla_rope_dim=args.mla_rope_dim,
        cca_compression=args.cca_compression,
        ccgqa=tuple(args.ccgqa),
        conv_kernels=tuple(args.conv_kernels),
        bias=args.bias,
    )
    costs = [
        attention_cost(cfg, args.seq_len, batch=args.batch, dtype=args.dtype, name=n) for n, cfg in configs.items()
    ]
    mha = costs[0]
    if args.format == "json":
        rows = []
        for c in costs:
            rows.append(
                {
                    "name": c.name,
                    "config": c.config.to_dict(),
                    "params": c.params,
                    "forward_flops": c.forward_flops,
                    "paper_forward_flops": c.paper_forward_flops,
                    "decode_flops": c.decode_flops,
                    "kv_bytes_per_token": c.kv_bytes_per_token,
                    "state_bytes_per_sequence": c.state_bytes_per_sequence,
                    "forward_speedup_vs_mha": mha.forward_flops / c.forward_flops,
                    "paper_forward_speedup_vs_mha": mha.paper_forward_flops / c.paper_forward_flops,
                    "kv_compression_vs_mha": mha.kv_bytes_per_token / c.kv_bytes_per_token,
                }
            )
        print(json.dumps({"seq_len": args.seq_len, "batch": args.batch, "dtype": args.dtype, "layers": rows}, indent=2))
        return 0
    header = ("attention", "heads q/kv", "params", "fwd GFLOP", "MHA/x", "Tab.II MHA/x", "decode MFLOP",
              "KV B/token", "MHA/x", "state B/seq")  # fmt: skip
    table = [header]
    for c in costs:
        cfg = c.config
        heads = f"{cfg.num_heads}/{'latent' if cfg.kind == 'mla' else cfg.num_kv_heads}"
        table.append(
            (
                c.name,
                heads,
                _fmt_int(c.params),
                f"{c.forward_flops / 1e9:,.1f}",
                f"{mha.forward_flops / c.forward_flops:.2f}",
                f"{mha.paper_forward_flops / c.paper_forward_flops:.2f}",
                f"{c.decode_flops / 1e6:,.1f}",
                _fmt_int(c.kv_bytes_per_token),
                f"{mha.kv_bytes_per_token / c.kv_bytes_per_token:.2f}",
                _fmt_int(c.state_bytes_per_sequence),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(
        f"one attention layer: E={args.hidden_size}, S={args.seq_len}, batch={args.batch}, cache dtype {args.dtype} "
        f"(FLOPs: 2 x multiply-adds, full S^2 attention; decode: one token over S cached)"
    )
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0
