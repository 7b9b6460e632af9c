"""How well scores separate members from non-members, and the epsilon that implies.

- AUC (Mann-Whitney, ties count half) and TPR at FPR 1% and 0.1% (the best TPR over
  thresholds whose FPR is at most the target; with n non-members FPR cannot be resolved
  below 1/n), each with a percentile bootstrap interval (members and non-members resampled
  separately).
- Empirical epsilon lower bound (Jagielski et al. 2020; Nasr et al. 2021): any
  (epsilon, delta)-DP mechanism forces TPR <= e^eps FPR + delta for every threshold test
  (and the same with members and non-members swapped), so eps >= log((TPR - delta) / FPR).
  To make it a statistically valid lower bound, TPR is replaced by its one-sided
  Clopper-Pearson lower bound and FPR by its upper bound, each at level alpha/2 (so both
  hold jointly with probability >= 1 - alpha). The threshold (and direction) is *chosen* on
  one random half of the records and the bound is *evaluated* on the other half, so
  picking the best of many thresholds does not inflate it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

FPR_TARGETS = (0.01, 0.001)


def auc(members: np.ndarray, others: np.ndarray) -> float:
    ranks = stats.rankdata(np.concatenate([members, others]))
    n, m = len(members), len(others)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def tpr_at_fpr(members: np.ndarray, others: np.ndarray, target: float) -> float:
    """Best TPR of a test "score > t" whose FPR is <= target (ties never help the attack)."""
    allowed = int(math.floor(target * len(others) + 1e-9))
    if allowed >= len(others):
        return 1.0
    threshold = np.sort(others)[::-1][allowed]
    return float(np.mean(members > threshold))


def bootstrap(members: np.ndarray, others: np.ndarray, rounds: int, rng: np.random.Generator,
              level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of AUC and TPR@FPR targets."""
    draws: dict[str, list[float]] = {"auc": [], **{f"tpr_at_fpr_{t:g}": [] for t in FPR_TARGETS}}
    for _ in range(rounds):
        a = members[rng.integers(0, len(members), len(members))]
        b = others[rng.integers(0, len(others), len(others))]
        draws["auc"].append(auc(a, b))
        for t in FPR_TARGETS:
            draws[f"tpr_at_fpr_{t:g}"].append(tpr_at_fpr(a, b, t))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {k: [float(x) for x in np.percentile(v, q)] for k, v in draws.items()}


def cp_lower(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower confidence bound on a rate, k successes out of n."""
    k = np.asarray(k, dtype=float)
    return np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1e-12), n - k + 1), 0.0)


def cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    k = np.asarray(k, dtype=float)
    return np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12)), 1.0)


def _bounds(members: np.ndarray, others: np.ndarray, thresholds: np.ndarray, delta: float, alpha: float) -> np.ndarray:
    """Certified epsilon per (direction, threshold): rows "score > t is member" and its mirror."""
    n, m = len(members), len(others)
    tp = n - np.searchsorted(np.sort(members), thresholds, side="right")   # members above t
    fp = m - np.searchsorted(np.sort(others), thresholds, side="right")    # non-members above t
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.log((cp_lower(tp, n, alpha) - delta) / cp_upper(fp, m, alpha))
        mirror = np.log((cp_lower(m - fp, m, alpha) - delta) / cp_upper(n - tp, n, alpha))
    return np.nan_to_num(np.vstack([forward, mirror]), nan=-np.inf)


def epsilon_lower_bound(members: np.ndarray, others: np.ndarray, delta: float, rng: np.random.Generator,
                        confidence: float = 0.95) -> dict[str, Any]:
    alpha = (1 - confidence) / 2
    pm, po = rng.permutation(len(members)), rng.permutation(len(others))
    sel_m, cert_m = members[pm[: len(pm) // 2]], members[pm[len(pm) // 2:]]
    sel_o, cert_o = others[po[: len(po) // 2]], others[po[len(po) // 2:]]
    thresholds = np.unique(np.concatenate([sel_m, sel_o]))
    chosen = _bounds(sel_m, sel_o, thresholds, delta, alpha)
    direction, index = np.unravel_index(int(np.argmax(chosen)), chosen.shape)
    certified = _bounds(cert_m, cert_o, thresholds[index:index + 1], delta, alpha)[direction, 0]
    return {
        "epsilon_lower_bound": float(max(0.0, certified)) if math.isfinite(certified) else 0.0,
        "confidence": confidence, "delta": delta, "threshold": float(thresholds[index]),
        # both rows certify the test "score > threshold is a member"; the second through its complement
        # (non-members at or below the threshold against members at or below it)
        "direction": "member if score > threshold" + ("" if direction == 0 else " (bound from the rates at or below it)"),
        "records_select_certify": [len(sel_m) + len(sel_o), len(cert_m) + len(cert_o)],
    }


def attack_metrics(members: np.ndarray, others: np.ndarray, delta: float, bootstraps: int,
                   rng: np.random.Generator, confidence: float = 0.95) -> dict[str, Any]:
    """Everything reported for one attack on one site; the epsilon bound at ``confidence`` (the audit
    raises it when it certifies several attacks and sites, so the family holds at 95 %)."""
    ci = bootstrap(members, others, bootstraps, rng) if bootstraps > 0 else {}
    out: dict[str, Any] = {"members": len(members), "non_members": len(others),
                           "auc": auc(members, others), "auc_ci95": ci.get("auc")}
    for t in FPR_TARGETS:
        key = f"tpr_at_fpr_{t:g}"
        out[key] = tpr_at_fpr(members, others, t)
        out[f"{key}_ci95"] = ci.get(key)
    out["fpr_resolution"] = 1.0 / len(others)
    out.update(epsilon_lower_bound(members, others, delta, rng, confidence))
    return out
