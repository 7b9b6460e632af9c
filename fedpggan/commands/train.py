"""``fedpggan train``: the centralised trainer."""

from __future__ import annotations

import argparse
import math

from fedpggan import config

OPTIONS = [
    "dataset", "data_dir", "image_size", "class_prior", "epochs", "batch_size", "g_batch_size", "d_steps",
    "loss_rule", "lr_d", "lr_g", "ema_decay", "latent_dim", "g_width", "d_width", "d_spectral_norm",
    "embedding_weight", "embedding_frequencies", "embedding_blur", "embedding_count_share", "embedding_share",
    "embedding_steps", "embedding_noise_limit",
    "epsilon", "delta",
    "max_grad_norm", "accountant", "grad_sample_mode", "fake_gradients", "noise_key", "checkpoint_every", "keep_checkpoints",
    "device", "seed", "out",
]
# Centralised training is plain PyTorch unless a budget is asked for (--epsilon E).
DEFAULTS = {"epsilon": math.inf}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the PGGAN on one machine (DP with --epsilon E)",
                       description="Centralised PGGAN training; with --epsilon E, D is trained with DP-SGD (Opacus' accountant).")
    config.add_arguments(p, OPTIONS, DEFAULTS)
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run in this folder from its newest verified "
                   "checkpoint, with its own options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedpggan.runs import config_to_resume, refuse_options_with_resume, resume_changes
    from fedpggan.train import train_centralised

    if args.resume:
        refuse_options_with_resume(args, OPTIONS)
        train_centralised(config_to_resume(args.resume, kind="centralised", changes=resume_changes(args)), resume=True)
    else:
        train_centralised(config.resolve(args, OPTIONS, DEFAULTS))
    return 0
