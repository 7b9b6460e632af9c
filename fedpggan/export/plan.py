"""Which image gets which split, label and generator: fixed up front from counts and seed.

The plan is tiny (a few bytes per image) and decides everything except the latents, so the
export is the same however it is chunked, and every split is one contiguous index range
that can be streamed into its own npz member.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpggan.errors import FedPGGANError
from fedpggan.export.options import SPLITS, apportion

PLAN_STREAM = 1  # seed stream for the label shuffles (latents use their own, see sampler.py)


@dataclass(frozen=True)
class SplitPlan:
    name: str
    start: int                 # first global image index of this split
    labels: np.ndarray         # (n,) class id per image, in export order
    generators: np.ndarray     # (n,) 0 = G1, 1 = G2; sorted: G1's rows come first

    @property
    def stop(self) -> int:
        return self.start + len(self.labels)


def make_plan(class_counts: list[int], split: tuple[float, float, float], generator: str,
              seed: int) -> list[SplitPlan]:
    """Splits with a non-zero fraction, each stratified by class (same class mix as the whole).

    With ``both``, each class is half G1 (the odd one included), half G2, and a split holds
    G1's images first, then G2's, each part shuffled. Keeping each generator's rows together
    means chunks feed one network at a time in equal-size batches, which keeps memory flat
    (variable-size batches fragment the heap), as ``PGGAN.sample`` orders "both" too."""
    label_dtype = np.uint8 if len(class_counts) <= 256 else np.int64
    per_split = np.array([apportion(c, list(split)) for c in class_counts]).T  # (3, classes)
    for name, fraction, counts in zip(SPLITS, split, per_split):
        if fraction > 0 and any(n == 0 and total > 0 for n, total in zip(counts, class_counts)):
            raise FedPGGANError(f"--split {'/'.join(f'{f:g}' for f in split)}: the {name} split would hold no image of "
                                f"some class ({counts.tolist()} per class), which an empty ImageFolder class folder and a "
                                "classifier cannot use; export more images (--n, --per-class) or set its fraction to 0")
    plans, start = [], 0
    for k, (name, fraction) in enumerate(zip(SPLITS, split)):
        if fraction <= 0:
            continue
        rng = np.random.default_rng([seed, PLAN_STREAM, k])
        g1 = {"both": (per_split[k] + 1) // 2, "1": per_split[k], "2": 0 * per_split[k]}[generator]
        parts = [g1, per_split[k] - g1]
        labels = np.concatenate([rng.permutation(np.repeat(np.arange(len(class_counts)), c)) for c in parts])
        generators = np.repeat([0, 1], [sum(c) for c in parts]).astype(np.uint8)
        plans.append(SplitPlan(name, start, labels.astype(label_dtype), generators))
        start += len(labels)
    return plans
