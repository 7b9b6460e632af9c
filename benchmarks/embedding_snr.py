"""How noisy is the DP mean-embedding target the generators chase?

    python benchmarks/embedding_snr.py --data-dir ../shared/data            # PneumoniaMNIST, 5 sites
    python benchmarks/embedding_snr.py --data-dir ../shared/data --frequencies 500 --blurs 0,1,2

For each (frequencies, blur, count share, epsilon) it splits the training set into IID sites as the simulation
does, makes every site's one-shot release exactly as ``client/site_round.py`` does (the noise
of ``--embedding-share`` of the budget), pools the releases as the server does, and reports the
error of each class's pooled mean embedding relative to the distance between the classes'
exact means. A ratio near or above 1 means the target of a class is mostly noise: the
generators are then pulled towards images no real class has. It also reports the "noise trap":
how close textures of pixel noise come to the real target. No training; seconds on a CPU.
Writes benchmarks/results/embedding-snr-<dataset>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from datetime import date
from pathlib import Path

import torch

from fedpggan.cli import run_reporting_errors
from fedpggan.config import RunConfig
from fedpggan.data import open_dataset
from fedpggan.io import atomic_write_bytes, atomic_write_json, new_results_paths, dataset_slug
from fedpggan.privacy.feature_release import features_for, release_noise, release_sum
from fedpggan.privacy.noise import SeededNoise
from pggan_model.mean_embedding import class_means

RESULTS = Path(__file__).resolve().parent / "results"


def pooled_means(data, sites: int, frequencies: int, sigma: float | None, noise_seed: int, blur: float,
                 count_share: float) -> torch.Tensor:
    """Class means of the pooled (noisy when ``sigma``) releases of ``sites`` IID sites; the
    split and the features are fixed, only the noise changes with ``noise_seed``."""
    order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))
    features = features_for(data.image_shape, frequencies, 0, blur)
    total = sum(release_sum(features, data.images[order[s::sites]], data.labels[order[s::sites]], data.num_classes,
                            count_share, sigma, SeededNoise(sites * noise_seed + s)) for s in range(sites))
    return class_means(total, count_share)[0]


def noise_trap(data, frequencies: int, blur: float) -> float:
    """Distance between the mean embedding of real images and that of "the mean image plus
    independent pixel noise of the real pixel spread": near 0, the embedding cannot tell
    noise textures from images, and generators that chase it learn textures."""
    features = features_for(data.image_shape, frequencies, 0, blur)
    images = data.images.double()
    mean = images.mean(0, keepdim=True)
    textures = (mean + (images - mean).std() * torch.randn(images.shape, generator=torch.Generator().manual_seed(0),
                                                           dtype=images.dtype)).clamp(-1, 1)
    return float((features(images).mean(0) - features(textures).mean(0)).norm())


def main(argv: list[str] | None = None) -> int:
    defaults = RunConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--data-dir", default="")
    p.add_argument("--sites", type=int, default=defaults.clients)
    p.add_argument("--frequencies", default="25,100,500,2000", help="comma-separated frequency counts")
    p.add_argument("--blurs", default="0", help="comma-separated --embedding-blur values (pixels)")
    p.add_argument("--epsilons", default="1,10", help="comma-separated per-site budgets")
    p.add_argument("--share", type=float, default=defaults.embedding_share)
    p.add_argument("--count-shares", default=str(defaults.embedding_count_share),
                   help="comma-separated --embedding-count-share values (the count's part of each record's norm)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=3, help="noise draws averaged per cell")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON and markdown results")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args, defaults), args.debug)


def run(args: argparse.Namespace, defaults: RunConfig) -> int:
    stem = Path(args.results) / f"embedding-snr-{dataset_slug(args.dataset)}-{date.today().isoformat()}"
    json_path, md_path = new_results_paths(stem)
    data = open_dataset(args.dataset, "train", args.data_dir or None)
    rows = []
    count_shares = [float(c) for c in args.count_shares.split(",")]
    sigmas = {e: release_noise(e, args.share, args.delta, defaults.accountant) for e in map(float, args.epsilons.split(","))}
    for frequencies in (int(f) for f in args.frequencies.split(",")):
        for blur in (float(b) for b in args.blurs.split(",")):
            # without noise the count share cancels out: the exact means and the trap need one share
            exact = pooled_means(data, args.sites, frequencies, None, 0, blur, count_shares[0])
            # per class, the distance to its nearest other class, as the product's gate reads it
            # (pggan_model.mean_embedding.release_noise_ratio); the same for two classes
            nearest = torch.cdist(exact.T, exact.T).fill_diagonal_(math.inf).min(dim=1).values
            separation = float(nearest.min())
            trap = noise_trap(data, frequencies, blur) / separation
            for count_share, (epsilon, sigma) in itertools.product(count_shares, sigmas.items()):
                errors = torch.stack([(pooled_means(data, args.sites, frequencies, sigma, r, blur, count_share) - exact).norm(dim=0)
                                      for r in range(args.repeats)]).mean(0)
                rows.append({"frequencies": frequencies, "blur": blur, "count_share": count_share, "eps": epsilon, "release_sigma": sigma,
                             "class_separation": separation, "noise_trap_over_separation": trap,
                             "noise_over_separation": {c: float(e / d) for c, e, d in zip(data.class_names, errors, nearest)}})
                print(json.dumps(rows[-1]))
    meta = {"dataset": args.dataset, "sites": args.sites, "share": args.share, "count_shares": args.count_shares, "delta": args.delta,
            "repeats": args.repeats, "records": len(data)}
    atomic_write_json(json_path, {"meta": meta, "rows": rows})
    lines = [f"# DP embedding target noise: {args.dataset}, {args.sites} IID sites, the release costing {args.share:g} of each site's epsilon",
             "", "Error of each class's pooled mean embedding / distance from its exact mean to the nearest other class's exact mean "
             f"(mean of {args.repeats} noise draws). Near or above 1: that class's target is mostly noise. "
             "Noise trap: distance from the real embedding to that of the mean image plus pixel noise, over the "
             "smallest such distance; small means noise textures match the target about as well as images.", "",
             "| frequencies | blur | count share | eps | release sigma | noise trap | " + " | ".join(data.class_names) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(data.class_names)]
    lines += [f"| {r['frequencies']} | {r['blur']:g} | {r['count_share']:g} | {r['eps']:g} | {r['release_sigma']:.2f} | {r['noise_trap_over_separation']:.2f} | "
              + " | ".join(f"{v:.2f}" for v in r["noise_over_separation"].values()) + " |" for r in rows]
    atomic_write_bytes(md_path, ("\n".join(lines) + "\n").encode())
    print(f"written: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
