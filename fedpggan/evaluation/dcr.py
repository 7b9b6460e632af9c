"""Memorisation: are synthetic images closer to the training records than fresh images are?

Distance to closest record (DCR), in pixel space (L2 over all pixels in [-1, 1]): a copied
or near-copied training image has a DCR to the training set near 0. Raw DCRs mean little
on their own (they depend on the image size, the data and how many records there are), so
they are compared with what *fresh real images* give:

* the real test split is split at random in two halves: a reference half ``T`` and a
  holdout half ``H``, which no model ever saw;
* for every synthetic image and every holdout image: d_train = DCR to the training split,
  d_test = DCR to ``T``;
* ``share_closer_to_train``: the fraction with d_train < d_test. For the holdout it is the
  baseline a generator that learnt the distribution without copying should match (it is
  high when the training split is much larger than ``T``: more records, nearer neighbours);
  ``excess_share`` = synthetic share - holdout share;
* ``dcr_ratio_median``: the median of d_train / d_test. Near 0 for copies; for fresh images
  a little below 1 (the training split is denser);
* ``dcr_train_p5``: the 5th percentile of d_train, i.e. the closest synthetic images; the
  ratio ``dcr_train_p5_ratio`` = synthetic / holdout well below 1 means some synthetic images
  are closer copies of training records than any fresh image is.

Reading them: copying shows as a positive excess share *together with* a median DCR ratio
and a 5th-percentile ratio below the holdout's. A positive excess share alone can come from
poor images: when every synthetic image is far from all real ones, the larger training split
wins by its size alone (its median DCR ratio is then nearer 1 than the holdout's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedpggan.errors import FedPGGANError

QUERY_CHUNK = 1024
REFERENCE_CHUNK = 8192
PERCENTILE = 5


def nearest_distance(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """L2 distance from each query to its nearest reference (flattened images or features),
    computed in chunks so memory stays bounded (at most QUERY_CHUNK x REFERENCE_CHUNK floats)."""
    q = queries.reshape(len(queries), -1).float()
    r = references.reshape(len(references), -1).float()
    out = torch.empty(len(q))
    for i in range(0, len(q), QUERY_CHUNK):
        block = q[i:i + QUERY_CHUNK]
        best = torch.full((len(block),), float("inf"))
        for j in range(0, len(r), REFERENCE_CHUNK):
            best = torch.minimum(best, torch.cdist(block, r[j:j + REFERENCE_CHUNK]).min(1).values)
        out[i:i + QUERY_CHUNK] = best
    return out


def dcr_stats(queries: torch.Tensor, train: torch.Tensor, test_reference: torch.Tensor) -> dict[str, float]:
    d_train, d_test = nearest_distance(queries, train), nearest_distance(queries, test_reference)
    return {"share_closer_to_train": float((d_train < d_test).float().mean()),
            "dcr_ratio_median": float((d_train / d_test.clamp_min(1e-12)).median()),
            "dcr_train_p5": float(np.percentile(d_train.numpy(), PERCENTILE)),
            "dcr_test_p5": float(np.percentile(d_test.numpy(), PERCENTILE)),
            "dcr_train_median": float(d_train.median()), "dcr_test_median": float(d_test.median())}


def memorisation(synthetic: torch.Tensor, train: torch.Tensor, test: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """DCR comparison of ``synthetic`` with a holdout half of ``test`` (see module docstring)."""
    if len(test) < 4 or len(train) < 1:
        raise FedPGGANError(f"memorisation check needs >= 4 real test images and a training split "
                            f"(got {len(test)} and {len(train)}); use a dataset with a test split")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(test)))
    reference, holdout = test[order[: len(test) // 2]], test[order[len(test) // 2:]]
    synth = dcr_stats(synthetic.cpu(), train.cpu(), reference.cpu())
    fresh = dcr_stats(holdout.cpu(), train.cpu(), reference.cpu())
    ratio = synth["dcr_train_p5"] / fresh["dcr_train_p5"] if fresh["dcr_train_p5"] > 0 else float("nan")
    return {"space": "pixel L2", "n_train": len(train), "n_test_reference": len(reference),
            "n_holdout": len(holdout), "synthetic": synth, "real_holdout": fresh,
            "excess_share": synth["share_closer_to_train"] - fresh["share_closer_to_train"],
            "dcr_train_p5_ratio": ratio}
