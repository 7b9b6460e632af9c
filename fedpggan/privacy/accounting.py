"""Privacy accounting for DP-SGD on the discriminator, on top of Opacus' accountants.

Privacy assumptions every function here relies on:
- the unit of privacy is one image (record) at one site, add/remove adjacency;
- each D step samples that site's records by Poisson sampling at rate q and adds Gaussian
  noise of std sigma * C to the sum of per-sample gradients clipped to norm C;
- a site's record count is public (it sets q, which the ledger records).
A site's spend is its accountant *history*, a list of (sigma, q, steps): epsilon is always
recomputed from the whole history, so spend is never forgotten between rounds or restarts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import opacus
from opacus.accountants import PRVAccountant, create_accountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_json

History = list[tuple[float, float, int]]
MAX_SIGMA = 2000.0
EPSILON_TOLERANCE = 0.01


# PRV discretises the privacy loss on a grid whose size grows with the epsilon and the steps; its
# memory is about 220 bytes a point (measured with opacus 1.6.0), so 5 million points is ~1 GB.
PRV_MAX_POINTS = 5_000_000
PRV_EPS_ERROR = 0.01  # Opacus' default eps_error of PRVAccountant.get_epsilon, which epsilon_of uses


class UnreachableBudget(FedPGGANError):
    """No noise multiplier up to MAX_SIGMA brings the planned mechanisms within the budget: callers
    that know which options set the plan re-raise it in those terms (feature_release, preflight)."""


def default_delta(num_records: int) -> float:
    """delta = min(1e-5, 1 / (10 n)): well below 1/n, so no record is likely to leak outright."""
    return min(1e-5, 1.0 / (10 * num_records))


def epsilon_of(history: History, delta: float, accountant: str = "prv", check_grid: bool = True) -> float:
    """Epsilon spent by a whole DP-SGD history at ``delta`` (0 for an empty history).

    ``check_grid=False`` skips the PRV memory check (a third of the call's time) for a history
    that is part of a plan :func:`calibrate_noise` has checked: the same noise over fewer steps
    needs a smaller grid. Training's per-round spend is such a history."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    if accountant == "prv" and check_grid:
        _check_prv_grid(acc, delta)
    try:
        return float(acc.get_epsilon(delta=delta))
    except RuntimeError as exc:  # PRV's discretisation breaks down at very small noise (a huge epsilon)
        if accountant != "prv":
            raise
        smallest = min(float(s) for s, _, _ in history)
        raise FedPGGANError(f"the PRV accountant cannot evaluate noise multiplier {smallest:.3g} ({exc}), as for a very "
                            "large --epsilon; use --accountant rdp") from None


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
                    prefix: History = ()) -> float:
    """Noise multiplier so that ``prefix`` (mechanisms already planned, e.g. a feature release)
    followed by ``steps`` DP-SGD steps at ``sample_rate`` ends at epsilon <= the budget.

    Calibrated once, for the whole planned run, so the final spend meets the budget. Same
    search as Opacus' ``get_noise_multiplier`` (doubling, then bisection to within 0.01).
    """
    if epsilon <= 0:
        raise FedPGGANError(f"--epsilon {epsilon} must be > 0 (or leave it out to train without DP)")
    if not 0 < delta < 1:
        raise FedPGGANError(f"--delta {delta} must be in (0, 1)")

    key = json.dumps([epsilon, delta, sample_rate, steps, accountant, [list(map(float, h)) for h in prefix],
                      opacus.__version__])

    def spent(sigma: float) -> float:
        return epsilon_of([*prefix, (sigma, sample_rate, steps)], delta, accountant)

    def meets_budget(sigma: float) -> bool:
        try:
            return spent(sigma) <= epsilon
        except FedPGGANError:  # e.g. a sigma so small that its PRV grid would not fit in memory
            return False

    cache = CalibrationCache()
    # A cached sigma is checked (one accountant call, against the ~20 of the search): the cache
    # is a file anyone with the account can edit, and must never let a site spend past its budget.
    if (sigma := cache.get(key)) is not None and meets_budget(sigma):
        return sigma

    low, high = 0.0, 10.0
    while spent(high) > epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise UnreachableBudget(
                f"--epsilon {epsilon}: no noise level reaches this budget for {steps} steps at sample rate "
                f"{sample_rate:.4g}; raise --epsilon or lower the number of steps"
            )
    while epsilon - spent(high) > EPSILON_TOLERANCE:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) < epsilon else (mid, high)
    cache.put(key, float(high))
    return float(high)


def _check_prv_grid(acc: PRVAccountant, delta: float) -> None:
    """Refuse, in one line, a history whose PRV grid would not fit in memory (a very large
    epsilon, i.e. very little noise, or very many steps): the accountant would otherwise run
    for minutes and then be killed for memory. Uses the grid Opacus itself would build."""
    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in acc.history]
    domain = acc._get_domain(prvs, [t for _, _, t in acc.history], PRV_EPS_ERROR, delta / 1000)  # get_epsilon's defaults
    if domain.size > PRV_MAX_POINTS:
        sigma, steps = min(s for s, _, _ in acc.history), sum(t for _, _, t in acc.history)
        raise FedPGGANError(f"the PRV accountant would need a grid of {domain.size / 1e6:.0f} million points (about "
                            f"{domain.size * 220 / 1e9:.0f} GB) for noise multiplier {sigma:.3g} over {steps} steps, as for "
                            "a very large --epsilon or very many steps; use --accountant rdp")


class CalibrationCache:
    """Memo of calibrate_noise on disk: a pure function of its arguments, whose PRV search takes
    seconds and is repeated by every site and by the server. A missing or unreadable cache is
    simply recomputed; set FEDPGGAN_CACHE to move it, or to an empty string to turn it off."""

    def __init__(self) -> None:
        where = os.environ.get("FEDPGGAN_CACHE", str(Path.home() / ".cache" / "fedpggan"))
        self.path = Path(where) / "calibration.json" if where else None

    def _read(self) -> dict[str, float]:
        try:
            return json.loads(self.path.read_text()) if self.path and self.path.exists() else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> float | None:
        return self._read().get(key)

    def put(self, key: str, sigma: float) -> None:
        if self.path is None:
            return
        try:
            atomic_write_json(self.path, {**self._read(), key: sigma})
        except OSError:
            pass  # a read-only home: calibration still works, only slower


def extend_history(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """History after ``steps`` more steps (merged with the last entry when sigma and q repeat)."""
    history = [tuple(h) for h in history]
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        s, q, t = history[-1]
        return [*history[:-1], (s, q, int(t) + steps)]
    return [*history, (noise_multiplier, sample_rate, steps)]
