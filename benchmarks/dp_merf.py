"""DP-MERF, the issue's strongest peer, measured with this product's own TSTR judge.

    python benchmarks/dp_merf.py --data-dir ../shared/data                         # eps 10 and 1, training seeds 0-2
    python benchmarks/dp_merf.py --data-dir ../shared/data --settings 5000:1e-2:500,500:1e-3:500 --training-seeds 0
    python benchmarks/dp_merf.py --data-dir ../shared/data --sites 5               # five sites' releases pooled

The committed files of 2026-12-03 were made by these three, plus ``--settings 5000:1e-3:1500`` and
``--settings 5000:1e-2:500 --epsilons 1 --training-seeds 1,2`` and ``--settings S --epsilons 0.5`` for S in
5000:1e-2:500, 5000:1e-3:500, 500:1e-3:500, 500:1e-2:500 (rows of one day's invocations are merged). A release at
``--epsilons 0.5`` is the PGGAN's own at eps 1 (half the budget, one holder or a secure sum).

The issue quotes DP-MERF (Harder et al., AISTATS 2021) at TSTR AUC 0.90 (eps 10) and 0.88 (eps 1) on
PneumoniaMNIST, measured with *another* small-CNN judge, so those figures and this product's are not
strictly comparable. This script re-measures the peer with the judge of ``fedpggan evaluate`` (5000
synthetic images with balanced labels, the small CNN, 3 classifier seeds, the real test split).

DP-MERF spends the whole budget on one release of the class-conditional mean embedding of random
Fourier features, then trains a generator on the distance to it (an MMD), with no discriminator. Here
the release is this product's own (``fedpggan.privacy.feature_release``: one unit-norm vector per record,
the Gaussian mechanism, the whole epsilon, delta 1e-5), made by one holder of all the training data (as
the paper does; ``--sites N`` pools the releases of N IID sites instead, each at the full noise), and the
generator is the product's G1, trained on the embedding loss alone. So only the objective differs from
the PGGAN runs. The paper tunes the number of features, the learning rate and the length of training:
each ``--settings`` entry (frequencies:learning rate:steps) is trained for every budget and training seed
and every one is reported, so the peer is credited with its best setting (a conservative comparison for
this product). Writes benchmarks/results/dp-merf-<dataset>-<device>-<date>[-<N>-sites].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from fedpggan.build import seed_everything
from fedpggan.cli import run_reporting_errors
from fedpggan.data import ImageDataset, open_dataset
from fedpggan.data.partition import partition
from fedpggan.errors import FedPGGANError
from fedpggan.evaluation.utility import scores_over_seeds, synthetic_set
from fedpggan.io import atomic_write_bytes, atomic_write_json
from fedpggan.privacy.feature_release import features_for, release_noise, release_sum
from fedpggan.privacy.noise import SeededNoise
from fedpggan.runs import library_versions
from pggan_model import PGGAN, GANConfig, GeneratorTrainer, ModelShape
from pggan_model.mean_embedding import RandomFourierFeatures, class_means

RESULTS = Path(__file__).resolve().parent / "results"
DELTA = 1e-5
ACCOUNTANT = "prv"  # the product's default (fedpggan.config)
COUNT_SHARE = 0.1  # the product's default split of each record's unit vector (pggan_model.mean_embedding)
BATCH = 128  # generated images per class-balanced step, as the product's generator steps


def parse_settings(text: str) -> list[tuple[int, float, int]]:
    """'frequencies:lr:steps,...' -> [(frequencies, lr, steps), ...]."""
    settings = []
    for item in text.split(","):
        try:
            frequencies, lr, steps = item.split(":")
            settings.append((int(frequencies), float(lr), int(steps)))
        except ValueError:
            raise FedPGGANError(f"--settings {item!r}: write frequencies:learning-rate:steps, e.g. 5000:1e-3:500") from None
    return settings


def private_class_means(data: ImageDataset, sites: int, frequencies: int, epsilon: float,
                        seed: int) -> tuple[RandomFourierFeatures, torch.Tensor]:
    """The random features and the class means of the pooled DP releases of ``sites`` IID sites, each
    release spending all of ``epsilon`` (privacy rests on feature_release's assumptions)."""
    features = features_for(data.image_shape, frequencies, seed)
    sigma = release_noise(epsilon, 1.0, DELTA, ACCOUNTANT)
    noise = SeededNoise(seed)  # a benchmark: reproducible draws (fedpggan.privacy.noise)
    total = sum(release_sum(features, data.images[torch.from_numpy(part)], data.labels[torch.from_numpy(part)],
                            data.num_classes, COUNT_SHARE, sigma, noise)
                for part in partition(data.labels, sites, "iid", seed=seed))
    return features, class_means(total, COUNT_SHARE)[0]


def train_generator(data: ImageDataset, features: RandomFourierFeatures, means: torch.Tensor, lr: float, steps: int,
                    seed: int) -> PGGAN:
    """G1 of the product's PGGAN, trained on the embedding loss alone (DP-MERF's objective); post-processing
    of the release, so it adds no privacy cost."""
    seed_everything(seed)
    gan = PGGAN(ModelShape(image_size=data.image_size, channels=data.channels, num_classes=data.num_classes),
                GANConfig(loss_rule="single", lr_g=lr))
    trainer = GeneratorTrainer(gan)
    trainer.match_embedding(features, means, 1.0)
    for _ in tqdm(range(steps), desc=f"DP-MERF generator (lr {lr:g})", leave=False):
        trainer.embedding_step(BATCH)
    return gan


def measure(args: argparse.Namespace, save: Callable[[dict], None]) -> None:
    """Train and judge every (setting, budget, training seed); ``save`` gets each row as it is measured."""
    train = open_dataset(args.dataset, "train", args.data_dir)
    test = open_dataset(args.dataset, "test", args.data_dir)
    for frequencies, lr, steps in parse_settings(args.settings):
        for epsilon in args.epsilons:
            for seed in args.training_seeds:
                start = time.perf_counter()
                features, means = private_class_means(train, args.sites, frequencies, epsilon, seed)
                gan = train_generator(train, features, means, lr, steps, seed)
                seconds = time.perf_counter() - start
                summary, _ = scores_over_seeds(lambda s: synthetic_set(gan, args.n_synthetic, "1", s), test,
                                               args.classifier_seeds, desc=f"eps {epsilon} seed {seed}", progress=False)
                row = {"frequencies": frequencies, "lr": lr, "steps": steps, "eps": epsilon, "sites": args.sites,
                       "training_seed": seed, "auc": summary["auc"]["mean"], "auc_std": summary["auc"]["std"],
                       "accuracy": summary["accuracy"]["mean"], "per_class_recall": summary["per_class_recall"]["mean"],
                       "train_s": round(seconds, 1)}
                print(f"DP-MERF {frequencies} frequencies, lr {lr:g}, {steps} steps, eps {epsilon}, seed {seed}: "
                      f"TSTR AUC {row['auc']:.3f} ± {row['auc_std']:.3f}", flush=True)
                save(row)


def markdown(rows: list[dict], meta: dict) -> str:
    holder = "one holder of all the training data" if meta["sites"] == 1 else f"each of {meta['sites']} IID sites, pooled"
    lines = [f"# DP-MERF with this product's TSTR judge ({meta['dataset']}, {meta['device']}, {meta['date']})", "",
             f"One release of the class-conditional mean embedding at the whole epsilon (delta {DELTA:g}) by {holder}; "
             f"the product's G1 trained on the embedding loss alone; TSTR with {meta['n_synthetic']} images, the small CNN, "
             f"{meta['classifier_seeds']} classifier seeds, the real test split.", "",
             "| frequencies | lr | steps | eps | training seed | TSTR AUC | ± | accuracy | recall per class | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        recall = " / ".join(f"{v:.2f}" for v in r["per_class_recall"])
        lines.append(f"| {r['frequencies']} | {r['lr']:g} | {r['steps']} | {r['eps']:g} | {r['training_seed']} | "
                     f"{r['auc']:.3f} | {r['auc_std']:.3f} | {r['accuracy']:.3f} | {recall} | {r['train_s']} |")
    lines += ["", "Mean over training seeds:", "", "| frequencies | lr | steps | eps | training seeds | TSTR AUC mean | std | per seed |",
              "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["frequencies"], r["lr"], r["steps"], r["eps"]), []).append(r["auc"])
    for (frequencies, lr, steps, eps), aucs in groups.items():
        spread = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        lines.append(f"| {frequencies} | {lr:g} | {steps} | {eps:g} | {len(aucs)} | {statistics.mean(aucs):.3f} | "
                     f"{spread:.3f} | {', '.join(f'{a:.3f}' for a in aucs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the MedMNIST npz files (e.g. ../shared/data)")
    p.add_argument("--dataset", default="pneumoniamnist", help="a MedMNIST name, an .npz path or an ImageFolder")
    p.add_argument("--epsilons", type=lambda s: [float(v) for v in s.split(",")], default=[10.0, 1.0])
    p.add_argument("--training-seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--settings", default="5000:1e-3:500",
                   help="comma-separated frequencies:learning-rate:steps to try (DP-MERF uses 5000 frequencies)")
    p.add_argument("--sites", type=int, default=1, help="1: one holder (as the paper); N: N IID sites' releases pooled")
    p.add_argument("--n-synthetic", type=int, default=5000)
    p.add_argument("--classifier-seeds", type=int, default=3)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args), args.debug)


def run(args: argparse.Namespace) -> int:
    meta = {"dataset": Path(args.dataset).stem, "device": "cpu", "date": date.today().isoformat(), "sites": args.sites,
            "n_synthetic": args.n_synthetic, "classifier_seeds": args.classifier_seeds, "delta": DELTA, "accountant": ACCOUNTANT,
            "count_share": COUNT_SHARE, "generator_batch": BATCH, "versions": library_versions()}
    stem = Path(args.results) / f"dp-merf-{meta['dataset']}-{meta['device']}-{meta['date']}{'' if args.sites == 1 else f'-{args.sites}-sites'}"
    earlier = stem.with_suffix(".json")
    if earlier.exists():  # its rows are merged under this run's meta: they must have been judged the same way
        judged = {k: json.loads(earlier.read_text()).get("meta", {}).get(k) for k in ("n_synthetic", "classifier_seeds")}
        if judged != {"n_synthetic": args.n_synthetic, "classifier_seeds": args.classifier_seeds}:
            raise FedPGGANError(f"{earlier}: holds rows judged with {judged['n_synthetic']} synthetic images and "
                                f"{judged['classifier_seeds']} classifier seeds; pass those (--n-synthetic, "
                                "--classifier-seeds) or another --results folder")

    def save(row: dict) -> None:
        """Merge ``row`` into the day's file (rows of earlier invocations stay; a re-measured row replaces
        its old self), after every row, so a stopped benchmark keeps what it measured."""
        path = stem.with_suffix(".json")
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
        rows.sort(key=row_key)
        atomic_write_json(path, {"meta": meta, "rows": rows})
        atomic_write_bytes(stem.with_suffix(".md"), markdown(rows, meta).encode())

    measure(args, save)
    print(stem.with_suffix(".md").read_text())
    return 0


def row_key(row: dict) -> tuple:
    return (row["frequencies"], row["steps"], row["lr"], -row["eps"], row["training_seed"])


if __name__ == "__main__":
    sys.exit(main())
