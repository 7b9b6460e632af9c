"""What an audit check reports, and the one numerical tolerance every comparison uses.

Epsilons from the PRV and PLD accountants are numerical (discretised) upper bounds, and the
noise calibration stops within 0.01 of the budget, so two honest computations of the same
spend differ slightly: values within ``REL_TOL * |reference| + ABS_TOL`` count as equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

REL_TOL = 0.02
ABS_TOL = 0.01


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
