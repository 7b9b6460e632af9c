"""Which generator steps will a run take? The averaged discriminator's DP noise that --g-steps 0 decides by.

    python benchmarks/generator_steps_noise.py --data-dir ../shared/data --rounds 60 --epsilons 1,2,3,5,7,10
    python benchmarks/generator_steps_noise.py --data-dir ../shared/data --dataset breastmnist --sites 3 --rounds 60

For each (epsilon, local steps) it splits the training set into IID sites as the simulation does, calibrates every
site's DP-SGD noise as the sites and the server do (fedpggan.privacy.mechanism.site_mechanism), and reports the noise
of the averaged discriminator's per-step gradient (fedpggan.privacy.mechanism.run_d_noise, which the server calls)
and the generator steps per round the rule takes for it (RunConfig.generator_steps; 8 at most
fedpggan.config.AUTO_G_STEPS_MAX_NOISE, 2 above). The same figures a run of the default options otherwise prints
when it starts and records in run.json's generator_steps. No training; seconds to a minute on a CPU.
Writes benchmarks/results/generator-steps-noise-<dataset>-<sites>sites-<rounds>rounds-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

from fedpggan.cli import run_reporting_errors
from fedpggan.config import AUTO_G_STEPS_MAX_NOISE, RunConfig
from fedpggan.data import open_dataset, partition
from fedpggan.io import atomic_write_bytes, atomic_write_json, new_results_paths, dataset_slug
from fedpggan.privacy.mechanism import run_d_noise, site_mechanism

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    defaults = RunConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pneumoniamnist", help="as simulate's --dataset")
    p.add_argument("--data-dir", default="")
    p.add_argument("--sites", type=int, default=defaults.clients)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--epsilons", type=comma_list(float), default="1,2,3,5,7,10",
                   help="comma-separated per-site budgets ('none': no DP)")
    p.add_argument("--local-steps", type=comma_list(int), default=str(defaults.local_steps),
                   help="comma-separated --local-steps values")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON and markdown results")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args, defaults), args.debug)


def comma_list(kind: type) -> Callable[[str], list]:
    """An argparse type: comma-separated values of ``kind`` ('none' as a float: no DP, as simulate's --epsilon none),
    a one-line usage error otherwise."""
    def parse(text: str) -> list:
        try:
            return [kind("inf") if kind is float and v == "none" else kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None
    return parse


def noise_row(cfg: RunConfig, sizes: list[int]) -> dict:
    """The rule's input and choice for one configuration, as the server computes them."""
    mechanisms = {n: site_mechanism(cfg, n, cfg.rounds * cfg.local_steps) for n in set(sizes)} if cfg.dp else {}
    noise = run_d_noise(cfg, sizes, mechanisms.__getitem__)
    return {"eps": cfg.epsilon, "local_steps": cfg.local_steps, "rounds": cfg.rounds,
            "noise_multiplier": [mechanisms[n].noise_multiplier for n in sizes if cfg.dp],
            "sample_rate": [mechanisms[n].sample_rate for n in sizes if cfg.dp],
            "averaged_d_noise": noise, "generator_steps": cfg.generator_steps(noise)}


def table_row(row: dict) -> str:
    sigmas = row["noise_multiplier"]
    sigma = f"{sum(sigmas) / len(sigmas):.3f}" if sigmas else "— (no DP)"
    return f"| {row['eps']:g} | {row['local_steps']} | {sigma} | {row['averaged_d_noise']:.4f} | {row['generator_steps']} |"


def run(args: argparse.Namespace, defaults: RunConfig) -> int:
    stem = Path(args.results) / f"generator-steps-noise-{dataset_slug(args.dataset)}-{args.sites}sites-{args.rounds}rounds-{date.today().isoformat()}"
    json_path, md_path = new_results_paths(stem)
    data = open_dataset(args.dataset, "train", args.data_dir or None)
    base = dataclasses.replace(defaults, dataset=args.dataset, data_dir=args.data_dir, clients=args.sites, rounds=args.rounds)
    base.validate()
    sizes = [len(part) for part in partition(data.labels.numpy(), args.sites, "iid", base.alpha, base.min_per_site, base.seed)]
    configs = [dataclasses.replace(base, epsilon=epsilon, local_steps=steps).validate()  # every row's options, before any row
               for epsilon, steps in itertools.product(args.epsilons, args.local_steps)]
    rows = []
    for cfg in configs:
        rows.append(noise_row(cfg, sizes))
        print(f"eps {cfg.epsilon:g}, {cfg.local_steps} local steps: averaged D noise {rows[-1]['averaged_d_noise']:.4f} -> "
              f"{rows[-1]['generator_steps']} generator steps per round")
    meta = {"dataset": args.dataset, "records": len(data), "sites": args.sites, "site_sizes": sizes, "partition": "iid",
            "rounds": args.rounds, "batch_size": base.batch_size, "delta": base.delta or "default min(1e-5, 1/(10 n))",
            "accountant": base.accountant, "embedding_share": base.embedding_share, "limit": AUTO_G_STEPS_MAX_NOISE}
    atomic_write_json(json_path, {"meta": meta, "rows": rows})
    lines = [f"# The generator-step rule's input: {args.dataset}, {args.sites} IID sites of {', '.join(map(str, sizes))} images, "
             f"{args.rounds} rounds", "",
             "Averaged discriminator's DP noise: each site's sigma / B (B = n q), root mean square over the sites, over "
             f"sqrt(sites averaged per round). `--g-steps 0` takes 8 generator steps per round where it is at most "
             f"{AUTO_G_STEPS_MAX_NOISE}, 2 above (fedpggan/config.py). Computed, not trained: "
             f"`python benchmarks/generator_steps_noise.py --dataset {args.dataset} --sites {args.sites} --rounds {args.rounds} "
             f"--epsilons {','.join(f'{e:g}' for e in args.epsilons)} --local-steps {','.join(map(str, args.local_steps))}`.", "",
             "| eps | local steps | sigma (site mean) | averaged D noise | generator steps |", "|---|---|---|---|---|"]
    lines += [table_row(r) for r in rows]
    atomic_write_bytes(md_path, ("\n".join(lines) + "\n").encode())
    print(f"written: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
