"""What an audit check reports, and the two numerical tolerances its comparisons use.

- Budgets and claims are judged without slack (``FLOAT_TOL``, rounding only): an honest claim
  is the declared accountant's value on the very history the audit recomputes (the same code,
  deterministic), a site refuses a round that would take it past its budget, and calibration
  stops at or below the budget. So a claim above the budget, or below what every accountant
  gives, is a violation however small the difference.
- Two *different* numerical computations (PRV against PLD, the noise calibration that stops
  within 0.01 below the budget, an attack's empirical bound) agree only up to
  ``REL_TOL * |reference| + ABS_TOL``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

REL_TOL = 0.02
ABS_TOL = 0.01
FLOAT_TOL = 1e-6


@dataclass(frozen=True)
class Finding:
    """A failed check: the ledger/run field at fault and one line saying why."""

    field: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def slack(reference: float) -> float:
    return REL_TOL * abs(reference) + ABS_TOL


def below(value: float, reference: float) -> bool:
    """``value`` is smaller than ``reference`` by more than the tolerance."""
    return value < reference - slack(reference)


def close(value: float, reference: float) -> bool:
    return abs(value - reference) <= slack(reference)


def exceeds(value: float, limit: float) -> bool:
    """``value`` is above ``limit`` by more than float rounding."""
    return value > limit + FLOAT_TOL * max(1.0, abs(limit))


def falls_short(value: float, reference: float) -> bool:
    """``value`` is below ``reference`` by more than float rounding."""
    return exceeds(reference, value)
