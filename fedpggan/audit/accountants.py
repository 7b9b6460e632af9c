"""Independent recomputation of a DP-SGD spend: Opacus RDP, Opacus PRV and Google's PLD.

A history is a list of (noise multiplier, sample rate, steps) of Poisson-subsampled Gaussian
steps. Each accountant returns an *upper bound* on the epsilon of that history at ``delta``:
RDP analytically (Balle et al. 2020 conversion), PRV as Opacus' upper error bound, PLD with
pessimistic discretisation. The true epsilon is therefore at most the smallest of them.
"""

from __future__ import annotations

import functools
import math
from importlib import metadata

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedpggan.privacy import epsilon_of

ACCOUNTANTS = ("rdp", "prv", "pld")
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' default orders
# Pessimistic PLD discretisation: coarser is faster and still an upper bound; 1e-3 stays
# within 0.01 of 1e-4 on the settings tested (tests/test_audit.py).
PLD_DISCRETISATION = 1e-3

History = tuple[tuple[float, float, int], ...]


def epsilon(accountant: str, history: History, delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` by one accountant (cached: audits ask repeatedly)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
    return _epsilon(accountant, tuple((float(s), float(q), int(t)) for s, q, t in history), float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon(accountant: str, history: History, delta: float) -> float:
    if accountant == "pld":
        return _pld(history, delta, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return epsilon_of(list(history), delta, accountant) if history else 0.0


def replace_one_epsilon(history: History, delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` under replace-one adjacency (one record swapped for
    another, the count unchanged), by Google's PLD with pessimistic discretisation: an upper bound.

    Privacy assumption: every step is a Poisson-subsampled Gaussian on a sum of per-record
    vectors of norm at most 1 (DP-SGD's clipped gradients in units of C, the release's unit
    vectors; the release is the entry with sample rate 1), so a swap moves the sum by at most 2,
    which PLD's REPLACE_ONE relation models; a secure release's shares count at the full release
    noise, as under add/remove (the server does not collude with the other sites). Informational:
    the budgets are stated under add/remove adjacency (README, Privacy), the record counts public."""
    return _pld(tuple((float(s), float(q), int(t)) for s, q, t in history), float(delta),
                dp_accounting.NeighboringRelation.REPLACE_ONE)


@functools.lru_cache(maxsize=256)
def _pld(history: History, delta: float, relation: dp_accounting.NeighboringRelation) -> float:
    if not history:
        return 0.0
    acc = PLDAccountant(neighboring_relation=relation, value_discretization_interval=PLD_DISCRETISATION)
    for sigma, q, steps in history:
        step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return float(acc.get_epsilon(delta))


def recompute(history: History, delta: float) -> tuple[dict[str, float], dict[str, str]]:
    """Epsilon by every accountant; an accountant that fails is reported, not fatal."""
    values, errors = {}, {}
    for name in ACCOUNTANTS:
        try:
            values[name] = epsilon(name, history, delta)
        except Exception as exc:  # numerical libraries raise many types on extreme parameters
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return values, errors


def rdp_curve(rounds: list[History], delta: float) -> list[float]:
    """Cumulative RDP epsilon after each round (one entry per round's history part).

    RDP adds up over composition, so this costs one RDP evaluation per distinct mechanism.
    """
    total = np.zeros(len(RDP_ORDERS))
    out = []
    for part in rounds:
        for sigma, q, steps in part:
            total = total + _rdp_per_step(float(sigma), float(q)) * int(steps)
        eps = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)[0] if total.any() else 0.0
        out.append(float(eps) if math.isfinite(eps) else math.inf)
    return out


@functools.lru_cache(maxsize=64)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS))


def versions() -> dict[str, str]:
    """Versions of the accounting libraries, so a recomputation can be reproduced."""
    out = {}
    for name in ("opacus", "dp-accounting"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["accountants"] = "rdp, prv: opacus; pld: dp-accounting PLDAccountant"
    return out
