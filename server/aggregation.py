"""Combine the sites' discriminators (and generators, with local generator training).

All rules give every site the same weight: a weight from a site's record count would put
that count into the model, and counts are only public when a site declares them so.
``median`` and ``trimmed-mean`` are robust: one hostile site cannot move them far.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("fedavg", "median", "trimmed-mean")
TRIM_FRACTION = 0.2  # trimmed-mean drops this share of values at each end (at least one of 3+)


def aggregate(states: list[dict[str, torch.Tensor]], rule: str = "fedavg") -> dict[str, torch.Tensor]:
    """Element-wise combination of state dicts with identical keys and shapes."""
    if not states:
        raise ValueError("nothing to aggregate")
    out = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key].to(torch.float64) for s in states])
        if not first.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
            out[key] = states[0][key].clone()
            continue
        if rule == "fedavg":
            value = stacked.mean(0)
        elif rule == "median":
            value = stacked.median(0).values if len(states) % 2 else stacked.quantile(0.5, dim=0)
        elif rule == "trimmed-mean":
            k = max(1, int(TRIM_FRACTION * len(states))) if len(states) >= 3 else 0
            value = stacked.sort(0).values[k : len(states) - k].mean(0)
        else:
            raise ValueError(f"unknown aggregation {rule!r}; choose one of {AGGREGATIONS}")
        out[key] = value.to(first.dtype)
    return out
