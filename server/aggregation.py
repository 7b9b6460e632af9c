"""Combine the sites' discriminators (and generators, with local generator training).

``fedavg`` gives every site the same weight. ``weighted`` gives each site its public record count
(FedAvg as McMahan et al. 2017 define it): the count already sets the site's sampling rate and is in the
ledger (README, What is assumed public), so the weights cost no privacy. Under DP a small site's D is far
noisier (the same clipped sum, divided by a smaller expected batch, with more noise for its larger
sampling rate): equal weights give its noise as much say as a large site's, count weights do not.
``median`` and ``trimmed-mean`` are robust: one hostile site cannot move them far.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpggan.config import AGGREGATIONS
from server.validation import ROBUST_MIN_UPDATES

TRIM_FRACTION = 0.2  # trimmed-mean drops this share of values at each end (at least one of 3+)


def aggregation_assumption(rule: str) -> str:
    """What the run's privacy ledger says of the rule (a federated run's assumptions)."""
    if rule == "weighted":
        return ("aggregation weights each site's discriminator by its public record count (the count that sets its "
                "sample rate): post-processing of public facts and DP outputs; a site that overstates its count "
                "takes over the average (against hostile sites use median or trimmed-mean)")
    return f"aggregation ({rule}) gives every site the same say, so no site's record count enters the model"


def aggregate(states: list[dict[str, torch.Tensor]], rule: str = "fedavg",
              record_counts: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Element-wise combination of state dicts with identical keys and shapes; ``record_counts``
    (the sites' public counts, in the order of ``states``) weight them under ``weighted``."""
    if not states:
        raise ValueError("nothing to aggregate")
    if rule == "weighted":
        if record_counts is None or len(record_counts) != len(states) or min(record_counts) < 1:
            raise ValueError(f"aggregation 'weighted' needs one positive record count per state, got {record_counts!r}")
        counts = torch.tensor([float(n) for n in record_counts], dtype=torch.float64)
        weights = counts / counts.sum()
    out = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key].to(torch.float64) for s in states])
        if not first.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
            out[key] = states[0][key].clone()
            continue
        if rule == "fedavg":
            value = stacked.mean(0)
        elif rule == "weighted":
            value = torch.tensordot(weights, stacked, dims=1)
        elif rule == "median":
            value = stacked.median(0).values if len(states) % 2 else stacked.quantile(0.5, dim=0)
        elif rule == "trimmed-mean":
            k = max(1, int(TRIM_FRACTION * len(states))) if len(states) >= ROBUST_MIN_UPDATES else 0
            value = stacked.sort(0).values[k : len(states) - k].mean(0)
        else:
            raise ValueError(f"unknown aggregation {rule!r}; choose one of {AGGREGATIONS}")
        out[key] = value.to(first.dtype)
    return out
