"""``fedpggan simulate``: the same command as ``python simulation/run.py``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from simulation.run import add_arguments, run_from_args

    p = sub.add_parser("simulate", help="federated DP training of N simulated sites (Flower simulation engine)",
                       description="Federated PGGAN: sites train D with DP-SGD (Opacus' accountant), the server trains G1/G2.")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
