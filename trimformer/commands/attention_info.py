"""`trimformer attention-info`: under construction in this branch (replaced by its owner)."""


def add_parser(subparsers):
    p = subparsers.add_parser("attention-info", help="(being built)")
    p.set_defaults(run=lambda args: 1)
