"""Empirical audit (``--mia``): attack the trained model and compare with the accounting.

An empirical lower bound on epsilon above the accountant's upper bound is a violation: either the
implementation does not deliver the DP it claims, or the non-members are not draws from the members'
distribution (the bound assumes they are; a held-out set collected apart inflates it), which the
finding says. The bounds of all sites and attacks hold together at 95 % (Bonferroni).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from fedpggan.audit import mia_attacks, mia_data
from fedpggan.audit.findings import Finding, slack
from fedpggan.audit.mia_stats import attack_metrics
from fedpggan.build import pick_device
from fedpggan.data import ImageDataset
from fedpggan.errors import FedPGGANError
from fedpggan.runs import RunFolder
from pggan_model import gan_from_checkpoint

METHOD = ("members: the site's training records (partition rebuilt from run.json); non-members: held-out real "
          "records; both sampled with the same count per class; attacks: discriminator logit (white-box) and "
          "-distance to the nearest synthetic image (black-box); 95% bootstrap intervals; epsilon lower bound from one-sided Clopper-Pearson bounds, "
          "threshold chosen on one half of the records and certified on the other, at a confidence that makes every site's and "
          "attack's bound hold together at 95% (Bonferroni); held-out images identical to a training image are left out")


@dataclass(frozen=True)
class MiaOptions:
    data_dir: str | None = None
    holdout: str | None = None
    max_records: int = 1000   # per side (members of a site, non-members)
    synthetic: int = 1000     # synthetic images for the distance attack
    bootstraps: int = 200
    device: str = "auto"
    seed: int = 0


def subsample(data: ImageDataset, k: int, rng: np.random.Generator) -> ImageDataset:
    return data if len(data) <= k else data.subset(np.sort(rng.choice(len(data), k, replace=False)))


def class_matched(members: np.ndarray, others: np.ndarray, k: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices into two label arrays that pick the same number of records of every class, at most
    ``k`` on each side. A held-out split often mixes the classes differently from training (the
    PneumoniaMNIST test split has 38 % normal images, the training split 26 %), and an attack would
    then tell the two sets apart by class instead of by membership, in either direction."""
    classes = np.union1d(members, others)
    have = np.array([min((members == c).sum(), (others == c).sum()) for c in classes])
    if not have.sum():
        raise FedPGGANError("--mia: no class has both training records and held-out records; pass a --holdout with "
                            "the run's classes")
    raw = have * min(k, have.sum()) / have.sum()
    take = np.floor(raw).astype(int)
    for i in np.argsort(take - raw)[: min(k, have.sum()) - take.sum()]:  # largest remainders first
        take[i] += 1
    pick = [(rng.choice(np.flatnonzero(members == c), n, replace=False), rng.choice(np.flatnonzero(others == c), n, replace=False))
            for c, n in zip(classes, take)]
    return np.sort(np.concatenate([m for m, _ in pick])), np.sort(np.concatenate([o for _, o in pick]))


def run_mia(folder: RunFolder, run: dict[str, Any], sites: dict[str, dict[str, Any]],
            options: MiaOptions) -> tuple[dict[str, Any], list[Finding]]:
    """Per site and attack: metrics; violations where the empirical bound beats the accountant.

    ``sites`` are the accounting rows (delta, tightest epsilon); empty for a run without DP.
    """
    path, _ = folder.latest_checkpoint()
    gan, _ = gan_from_checkpoint(path, pick_device(options.device))
    site_ids = list(sites) or (["central"] if run["kind"] == "centralised"
                               else [str(i) for i in range(int(run["config"].get("clients", 0)))])
    members = mia_data.member_sets(folder, run, site_ids, options.data_dir)
    rng = np.random.default_rng(options.seed)
    others = subsample(mia_data.non_members(run, options.data_dir, options.holdout)
                       .in_class_order((run.get("dataset") or {}).get("class_names") or [], "--holdout"), options.max_records, rng)
    have = (others.num_classes, others.channels, others.image_size)
    want = (gan.shape.num_classes, gan.shape.channels, gan.shape.image_size)
    if have != want:
        raise FedPGGANError(f"--holdout/--data-dir: {have[0]} classes of {have[1]}x{have[2]}px images, the model makes "
                            f"{want[0]} classes of {want[1]}x{want[2]}px; pass data of the run's classes and shape")
    others, duplicates = without_training_images(others, members.values())
    synthetic = mia_attacks.synthetic_images(gan, options.synthetic, options.seed)
    other_scores = {"discriminator": mia_attacks.discriminator_scores(gan, others),
                    "distance": mia_attacks.distance_scores(synthetic, others)}
    attacks = ("discriminator", "distance")
    confidence = 1 - 0.05 / (len(members) * len(attacks))
    results: dict[str, Any] = {"checkpoint": path.name, "method": METHOD, "sites": {}, "confidence_each": confidence,
                               "holdout_left_out_as_training_images": duplicates}
    findings = []
    for site_id, data in tqdm(members.items(), desc="membership inference", unit="site"):
        mine_idx, others_idx = class_matched(data.labels.numpy(), others.labels.numpy(), options.max_records, rng)
        mine = data.subset(mine_idx)
        scores = {"discriminator": mia_attacks.discriminator_scores(gan, mine),
                  "distance": mia_attacks.distance_scores(synthetic, mine)}
        row = sites.get(site_id, {})
        delta = float(row.get("delta", 0.0))
        results["sites"][site_id] = per_attack = {
            name: attack_metrics(scores[name], other_scores[name][others_idx], delta, options.bootstraps, rng, confidence)
            for name in attacks}
        bound = row.get("tightest_epsilon")
        for name, m in per_attack.items():
            if bound is not None and m["epsilon_lower_bound"] > bound + slack(bound):
                findings.append(Finding(f"mia.{site_id}.{name}.epsilon_lower_bound",
                                        f"empirical epsilon >= {m['epsilon_lower_bound']:.3g} (95% with the other bounds) "
                                        f"exceeds the accounted {bound:.3g}: the model leaks more than the DP guarantee "
                                        "allows, or the held-out images are not from the training images' distribution "
                                        "(check --holdout)"))
    return results, findings


def without_training_images(others: ImageDataset, members: Any) -> tuple[ImageDataset, int]:
    """The held-out records minus any image identical to a training image (a copy in both splits, or a
    --holdout that overlaps the training data): scored as a non-member, a member would look like a leak
    that is none. Returns them and how many were left out."""
    seen = {image_key(x) for data in members for x in data.images}
    keep = [i for i, x in enumerate(others.images) if image_key(x) not in seen]
    if not keep:
        raise FedPGGANError("--holdout: every held-out image is also a training image of the run; pass records the run "
                            "never saw")
    return (others if len(keep) == len(others) else others.subset(np.array(keep))), len(others) - len(keep)


def image_key(image: Any) -> bytes:
    """An image's 8-bit pixels (the loaders map 0..255 to [-1, 1] exactly)."""
    return np.round((image.numpy() + 1) * 127.5).astype(np.uint8).tobytes()
