"""Does keeping the synthetic images the DP discriminator likes best make better training data?

    python benchmarks/discriminator_selection.py RUN [RUN ...] --data-dir ../shared/data

For each run folder: TSTR (the evaluation's small CNN, --n images, --seeds classifier seeds) of
plain samples beside samples drawn --oversample times over and cut back to n/K per class by the
run's aggregated discriminator, ranked by
  - ``realism``: D(x, y), how real the image looks for the label it was made for
    (discriminator rejection sampling in its simplest, top-k form), or
  - ``margin``:  D(x, y) - max over y' != y of D(x, y'), how much more it fits its own label.
Only released networks are used (D and the generators), so selection is post-processing and
costs no privacy. Writes benchmarks/results/discriminator-selection-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from fedpggan.cli import run_reporting_errors
from fedpggan.data import open_dataset
from fedpggan.evaluation.utility import SAMPLE_CHUNK, TrainSet, scores_over_seeds, synthetic_set
from fedpggan.io import atomic_write_bytes, atomic_write_json, new_results_paths
from fedpggan.runs import RunFolder, library_versions, recorded_generator_steps
from pggan_model import PGGAN, gan_from_checkpoint

RANKINGS = ("realism", "margin")
# what tells the runs apart in the table, by the trainer that made them
SETTINGS = {"federated": ("rounds", "local-steps", "g-steps", "embedding-share"),
            "centralised": ("epochs", "d-steps", "embedding-share")}


@torch.no_grad()
def selection_score(gan: PGGAN, images: torch.Tensor, labels: torch.Tensor, ranking: str) -> torch.Tensor:
    """Per image: D(x, y) (``realism``) or D(x, y) - max_{y' != y} D(x, y') (``margin``)."""
    k = gan.shape.num_classes
    scores = []
    for x, y in zip(images.split(SAMPLE_CHUNK), labels.split(SAMPLE_CHUNK)):
        own = gan.d(x, y)
        if ranking == "margin":
            own = own - torch.stack([gan.d(x, (y + shift) % k) for shift in range(1, k)]).amax(0)
        scores.append(own)
    return torch.cat(scores)


def selected_set(gan: PGGAN, n: int, oversample: int, ranking: str, seed: int) -> TrainSet:
    """``n`` images with balanced labels: the best n/K per class of ``oversample * n`` samples."""
    images, labels = synthetic_set(gan, oversample * n, "both", seed)
    score = selection_score(gan, images, labels, ranking)
    quotas = torch.bincount(torch.arange(n) % gan.shape.num_classes)  # the balance synthetic_set gives n images
    keep = []
    for c, quota in enumerate(quotas.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        keep.append(members[score[members].argsort(descending=True)[:quota]])
    keep = torch.cat(keep)
    return images[keep], labels[keep]


def measure(run: Path, data_dir: str | None, n: int, oversample: int, seeds: int) -> list[dict]:
    folder = RunFolder(run)
    gan, payload = gan_from_checkpoint(folder.latest_checkpoint()[0])
    info = folder.read_run()
    config = info["config"]
    ledger = folder.vouched_ledger()
    spent = ((ledger or {}).get("guarantee") or {}).get("epsilon")  # what the run spent, not its budget
    test = open_dataset(config["dataset"], "test", data_dir or config.get("data-dir") or None, gan.shape.image_size)
    sets: dict[str, Callable[[int], TrainSet]] = {"none": lambda seed: synthetic_set(gan, n, "both", seed)}
    sets.update({r: (lambda seed, r=r: selected_set(gan, n, oversample, r, seed)) for r in RANKINGS})
    rows = []
    for ranking, train_set in sets.items():
        summary, _ = scores_over_seeds(train_set, test, seeds, desc=f"{run.name} {ranking}", progress=False)
        rows.append({"run": str(run), "round": payload.get("round"), "epsilon": spent, "budget_epsilon": config.get("epsilon"),
                     "ledger_verified": ledger is not None,
                     "settings": {**{k: config.get(k) for k in SETTINGS.get(info.get("kind"), SETTINGS["federated"])},
                                  **({"g-steps": recorded_generator_steps(info)} if info.get("kind") == "federated" else {})},
                     "ranking": ranking, "oversample": 1 if ranking == "none" else oversample,
                     "auc": summary["auc"]["mean"], "auc_std": summary["auc"]["std"],
                     "accuracy": summary["accuracy"]["mean"], "per_class_recall": summary["per_class_recall"]["mean"]})
        print(f"{run.name} {ranking}: AUC {rows[-1]['auc']:.3f} ± {rows[-1]['auc_std']:.3f}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Selecting synthetic images with the DP discriminator ({meta['device']}, {meta['date']})", "",
             f"TSTR AUC of {meta['n']} images (small CNN, {meta['seeds']} classifier seeds): plain samples vs the "
             f"best n/K per class of {meta['oversample']}x as many by D's realism or class margin.", "",
             "| run | eps spent | settings | plain | ± | realism | ± | margin | ± |", "|---|---|---|---|---|---|---|---|---|"]
    by_run: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], {})[r["ranking"]] = r
    for run, cells in by_run.items():
        values = " | ".join(f"{cells[k]['auc']:.3f} | {cells[k]['auc_std']:.3f}" for k in ("none", *RANKINGS))
        settings = ", ".join(f"{k} {v}" for k, v in cells["none"]["settings"].items())
        spent = cells["none"]["epsilon"]
        shown = ("unverified ledger" if not cells["none"].get("ledger_verified", True) else
                 "no DP" if spent is None else f"{spent:.2f}")
        lines.append(f"| {Path(run).name} | {shown} | {settings} | {values} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (centralised or federated)")
    p.add_argument("--data-dir", default=None, help="folder with the real data (default: the run's own)")
    p.add_argument("--n", type=int, default=5000, help="synthetic training images per classifier")
    p.add_argument("--oversample", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args), args.debug)


def run(args: argparse.Namespace) -> int:
    meta = {"device": "cpu", "date": date.today().isoformat(), "n": args.n, "oversample": args.oversample,
            "seeds": args.seeds, "versions": library_versions()}
    stem = Path(args.results) / f"discriminator-selection-{meta['device']}-{meta['date']}"
    json_path, md_path = new_results_paths(stem)
    rows = [row for run in args.runs for row in measure(run, args.data_dir, args.n, args.oversample, args.seeds)]
    atomic_write_json(json_path, {"meta": meta, "rows": rows})
    text = markdown(rows, meta)
    atomic_write_bytes(md_path, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
