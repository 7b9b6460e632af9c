"""Who was a member: the records each site trained on, rebuilt from run.json.

The partition is a pure function of (dataset, seed, scheme, alpha, min-per-site, clients),
so the auditor reconstructs it exactly with :func:`fedpggan.data.partition`; a centralised
run's members are all training records. Non-members are real records of the same
distribution the run never saw: the dataset's test split, or a held-out set the user names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpggan.build import open_training_data
from fedpggan.config import RunConfig
from fedpggan.data import ImageDataset, open_dataset, partition
from fedpggan.data.medmnist import MEDMNIST
from fedpggan.data.partition import check_same_partition
from fedpggan.errors import FedPGGANError
from fedpggan.runs import RunFolder, current_options


def run_data_config(run: dict[str, Any], data_dir: str | None) -> RunConfig:
    c = current_options(run)  # where a resume moved the data, not where the run began
    try:
        return RunConfig(dataset=str(c["dataset"]), data_dir=data_dir or str(c.get("data-dir") or ""),
                         image_size=int(c["image-size"]), seed=int(c.get("seed", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise FedPGGANError(f"run.json: config lacks dataset/image-size ({exc}); cannot rebuild the members for --mia") from exc


def member_sets(folder: RunFolder, run: dict[str, Any], site_ids: list[str], data_dir: str | None) -> dict[str, ImageDataset]:
    """Each site's training records (sites whose id is not a partition index are left out), checked
    against the hashes partition.json recorded when the run began."""
    if run["kind"] != "centralised" and not any(s.isdigit() for s in site_ids):
        raise FedPGGANError(f"--mia: this run's sites ({', '.join(site_ids[:3])}{', ...' if len(site_ids) > 3 else ''}) "
                            "are deployed sites, not simulated partitions: their records never left them, so no auditor "
                            "holds the members; run --mia on a simulation of the same configuration")
    cfg = run_data_config(run, data_dir)
    if cfg.dataset.lower() not in (*MEDMNIST, "phantom", "auto") and not Path(cfg.dataset).expanduser().exists():
        raise FedPGGANError(f"--mia: the run's training data {cfg.dataset} (run.json) is not there any more; put it back "
                            "where the run read it: the members are rebuilt from it")
    data = open_training_data(cfg)
    expected = (run.get("dataset") or {}).get("num_records")
    if expected is not None and len(data) != expected:
        raise FedPGGANError(f"--data-dir: the data found has {len(data)} training records, the run trained on {expected}; "
                            "pass the data the run used")
    if run["kind"] == "centralised":
        return {"central": data}
    c = current_options(run)  # where a resume moved the data, not where the run began
    try:
        parts = partition(data.labels, int(c["clients"]), str(c["partition"]), float(c["alpha"]),
                          int(c["min-per-site"]), int(c.get("seed", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise FedPGGANError(f"run.json: config lacks clients/partition/alpha/min-per-site ({exc}); cannot rebuild the partition") from exc
    if (folder.root / "partition.json").is_file():
        check_same_partition(folder.read_json(folder.root / "partition.json"), data, parts, "pass the data the run used (--data-dir)")
    members = {s: data.subset(parts[int(s)]) for s in site_ids if s.isdigit() and int(s) < len(parts)}
    recorded = run.get("sites") if isinstance(run.get("sites"), dict) else {}
    for s, subset in members.items():
        if s in recorded and recorded[s] != len(subset):
            raise FedPGGANError(f"run.json: site {s} trained on {recorded[s]} records, the rebuilt partition gives it "
                                f"{len(subset)}; pass the data the run used (--data-dir)")
    return members


def non_members(run: dict[str, Any], data_dir: str | None, holdout: str | None) -> ImageDataset:
    """Real records outside training: ``holdout``'s test split, else the run dataset's."""
    cfg = run_data_config(run, data_dir)
    if holdout:
        return open_dataset(holdout, "test", cfg.data_dir or None, cfg.image_size, cfg.seed, named_by="--holdout")
    return open_training_data(cfg, split="test")
