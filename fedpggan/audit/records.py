"""Typed views of the run's JSON files, so every check reads numbers, never raw dicts.

A site field that is missing or not a number is a finding (the ledger cannot support its
claim); a ledger that is not even shaped like one is an error (the audit cannot run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedpggan.audit.findings import Finding
from fedpggan.errors import FedPGGANError
from fedpggan.privacy.ledger import spent_outside_rounds, unreported_round

MECHANISM = ("budget_epsilon", "delta", "noise_multiplier", "sample_rate", "planned_steps", "public_num_records", "epsilon")
KINDS = ("centralised", "federated")


@dataclass(frozen=True)
class Round:
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    epsilon: float | None


@dataclass
class Site:
    """One site's ledger entry, parsed."""

    site_id: str
    budget_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    planned_steps: int
    public_num_records: int
    epsilon: float
    status: str
    rounds: list[Round] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    # The one-shot embedding release (sigma, 1.0, 1) spent before round 1, when the run used one.
    release: tuple[float, float, int] | None = None
    # A release summed securely: (the least noisy share the site sent, sites in the sum; for a site
    # left out of it, the sum it was registered for).
    release_share: tuple[float, int] | None = None
    # Why the site's share is not in the secure sum (None: it is, or the release was plain).
    release_left_out: str | None = None
    # The peers whose signed keys the site checked before masking its share (None: it did not check).
    key_list_signers: list[str] | None = None

    @property
    def prefix(self) -> str:
        return f"sites.{self.site_id}"

    @property
    def release_history(self) -> tuple[tuple[float, float, int], ...]:
        return () if self.release is None else (self.release,)

    @property
    def release_spent(self) -> bool:
        """Whether the site made its release. A secure one is made before round 1 by every site
        (a left-out site charged it too); a plain one rides on the site's first round, so a site
        that was never sent a round (only ``not_selected`` under --fraction) has not spent it."""
        never_sent_a_round = not self.rounds and bool(self.events) and all(
            e.get("event") == "not_selected" for e in self.events)
        return self.release_share is not None or not never_sent_a_round

    @property
    def unreported_round(self) -> int | None:
        """A failed or unanswered round after the site's last report (fedpggan.privacy.ledger.unreported_round):
        the guarantee counts the site at its budget."""
        return unreported_round({"rounds": [{"round": r.round} for r in self.rounds], "events": self.events})

    @property
    def unrecorded_steps(self) -> int:
        """DP-SGD steps the site spent that no recorded round holds: those the server counted from the
        site's reported step total (``unrecorded_spend``; ``spent_before_resume`` not replayed) or, if
        more, what a site whose update was excluded reported beyond its recorded rounds and release."""
        counted = sum(int(number(e.get("steps")) or 0) for e in self.events if spent_outside_rounds(e))
        recorded = sum(r.steps for r in self.rounds) + (1 if self.release_spent and self.release else 0)
        reported = max((int(number(e.get("reported_total_steps")) or 0) for e in self.events
                        if e.get("event") == "excluded"), default=0)
        return max(counted, reported - recorded, 0)

    @property
    def history(self) -> tuple[tuple[float, float, int], ...]:
        """The accountant history: the release (if spent), then the rounds, equal mechanisms merged,
        then the steps spent outside the recorded rounds (at the site's mechanism, fixed for the run)."""
        out: list[tuple[float, float, int]] = list(self.release_history if self.release_spent else ())
        spent = [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.rounds]
        if unrecorded := self.unrecorded_steps:
            spent.append((self.noise_multiplier, self.sample_rate, unrecorded))
        for sigma, q, steps in spent:
            if out and out[-1][:2] == (sigma, q):
                out[-1] = (sigma, q, out[-1][2] + steps)
            else:
                out.append((sigma, q, steps))
        return tuple(out)


@dataclass(frozen=True)
class RunFacts:
    """What the checks need from run.json and the run folder besides the ledger."""

    kind: str
    config: dict[str, Any]
    status: str
    num_records: int | None
    end_round: int  # the last round/epoch the run reached (ledger, checkpoints, metrics)


def as_list(value: Any) -> list[Any]:
    """``value`` if it is a list, else an empty one (a damaged field is reported where it is parsed)."""
    return value if isinstance(value, list) else []


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def parse_site(site_id: str, raw: Any) -> tuple[Site | None, list[Finding]]:
    """The site, or None with one finding per missing/invalid mechanism field."""
    prefix = f"sites.{site_id}"
    if not isinstance(raw, dict):
        return None, [Finding(prefix, "site entry is not an object")]
    values = {k: number(raw.get(k)) for k in MECHANISM}
    bad = [Finding(f"{prefix}.{k}", f"missing or not a finite number ({raw.get(k)!r}); epsilon cannot be recomputed")
           for k, v in values.items() if v is None]
    if values["public_num_records"] is not None and values["public_num_records"] < 1:
        bad.append(Finding(f"{prefix}.public_num_records", f"{raw.get('public_num_records')!r}: a site holds at least one record"))
    if not isinstance(raw.get("events", []), list):
        bad.append(Finding(f"{prefix}.events", "not a list; the site's events cannot be read"))
    if not isinstance(raw.get("accountant"), str):
        bad.append(Finding(f"{prefix}.accountant", f"missing ({raw.get('accountant')!r}); the ledger must name its accountant"))
    if number(raw.get("max_grad_norm")) is None:
        bad.append(Finding(f"{prefix}.max_grad_norm", f"missing or not a finite number ({raw.get('max_grad_norm')!r}); "
                                                      "the clipping norm the noise is scaled to cannot be checked"))
    rounds, round_findings = _parse_rounds(prefix, raw.get("rounds"), values)
    bad += round_findings + _event_findings(prefix, raw.get("events"))
    release, release_share, release_findings = _parse_release(prefix, raw.get("feature_release"))
    bad += release_findings
    if bad:
        return None, bad
    site = Site(
        site_id=site_id, budget_epsilon=values["budget_epsilon"], delta=values["delta"], accountant=raw["accountant"],
        noise_multiplier=values["noise_multiplier"], sample_rate=values["sample_rate"],
        max_grad_norm=float(raw["max_grad_norm"]), planned_steps=int(values["planned_steps"]),
        public_num_records=int(values["public_num_records"]), epsilon=values["epsilon"],
        status=str(raw.get("status", "")), rounds=rounds,
        events=[e for e in as_list(raw.get("events")) if isinstance(e, dict)],
        release=release, release_share=release_share, key_list_signers=_verified_signers(raw.get("feature_release")),
        release_left_out=_left_out(raw.get("feature_release")),
    )
    return site, []


def count(value: Any) -> int | None:
    """``value`` as a non-negative integer (a round number, a step count), else None."""
    n = number(value)
    return int(n) if n is not None and n >= 0 and n.is_integer() else None


def _event_findings(prefix: str, raw: Any) -> list[Finding]:
    """A damaged event is a violation: its round would otherwise be read as round 0 or explain a gap."""
    bad = []
    for i, e in enumerate(as_list(raw)):
        if not isinstance(e, dict) or not isinstance(e.get("event"), str) or count(e.get("round")) is None:
            bad.append(Finding(f"{prefix}.events[{i}]", f"needs an event name and a non-negative integer 'round', got {e!r}"))
        elif "steps" in e and count(e["steps"]) is None:
            bad.append(Finding(f"{prefix}.events[{i}].steps", f"{e['steps']!r} is not a non-negative integer step count"))
    return bad


def _parse_rounds(prefix: str, raw: Any, site: dict[str, float | None]) -> tuple[list[Round], list[Finding]]:
    """Rounds; a round's mechanism fields default to the site's (older ledgers omit them)."""
    if not isinstance(raw, list):
        return [], [Finding(f"{prefix}.rounds", "missing or not a list")]
    rounds, bad = [], []
    for i, r in enumerate(raw):
        where = f"{prefix}.rounds[{i}]"
        if not isinstance(r, dict) or number(r.get("round")) is None or number(r.get("steps")) is None:
            bad.append(Finding(where, "needs integer 'round' and 'steps'"))
            continue
        vals = {k: number(r[k]) if k in r else site[k] for k in ("noise_multiplier", "sample_rate", "delta")}
        if any(v is None for v in vals.values()):
            bad.append(Finding(where, "noise_multiplier/sample_rate/delta not finite numbers"))
            continue
        rounds.append(Round(int(r["round"]), int(r["steps"]), vals["noise_multiplier"], vals["sample_rate"],
                            vals["delta"], number(r.get("epsilon"))))
    return rounds, bad


def _parse_release(prefix: str, raw: Any) -> tuple[tuple[float, float, int] | None, tuple[float, int] | None, list[Finding]]:
    """The embedding release: a Gaussian mechanism (sigma, sample rate 1, 1 step), or none; and,
    when it was summed securely, the site's own share of the noise and the number of sites."""
    if raw is None:
        return None, None, []
    sigma = number(raw.get("noise_multiplier")) if isinstance(raw, dict) else None
    if sigma is None or not isinstance(raw, dict) or raw.get("sample_rate") != 1.0 or raw.get("steps") != 1:
        return None, None, [Finding(f"{prefix}.feature_release", f"must be {{noise_multiplier, sample_rate: 1.0, steps: 1}}, got {raw!r}")]
    if raw.get("aggregation") != "secure":
        return (sigma, 1.0, 1), None, []
    share, sites = number(raw.get("share_noise_multiplier")), raw.get("sites")
    if share is None or not isinstance(sites, int) or sites < 1:
        return None, None, [Finding(f"{prefix}.feature_release", "summed securely but share_noise_multiplier or sites missing: "
                                                                 "the worst case cannot be recomputed")]
    return (sigma, 1.0, 1), (share, sites), []


def _left_out(raw: Any) -> str | None:
    """Why a site's share is not in the secure sum (the server left it out after it failed)."""
    why = raw.get("left_out") if isinstance(raw, dict) else None
    return None if why is None else str(why)


def _verified_signers(raw: Any) -> list[str] | None:
    """The signers a site verified in a secure release's key list; None if it took the list on trust."""
    key_list = raw.get("key_list") if isinstance(raw, dict) else None
    if isinstance(key_list, dict) and key_list.get("verified") is True and isinstance(key_list.get("signers"), list):
        return [str(name) for name in key_list["signers"]]
    return None


def check_shape(ledger: Any, path: str) -> None:
    """Refuse a file that is not a privacy ledger at all (the audit cannot run)."""
    if not isinstance(ledger, dict) or not isinstance(ledger.get("dp"), bool):
        raise FedPGGANError(f"{path}: not a fedpggan privacy ledger (no boolean 'dp'); pass the run folder the trainer wrote")
    if ledger["dp"] and not isinstance(ledger.get("sites"), dict):
        raise FedPGGANError(f"{path}: 'sites' missing or not an object; the ledger is damaged, restore it from backup")
    if not isinstance(ledger.get("checkpoints", []), list):
        raise FedPGGANError(f"{path}: 'checkpoints' is not a list; the ledger is damaged, restore it from backup")


def run_kind(run: Any, path: str) -> str:
    if not isinstance(run, dict) or run.get("kind") not in KINDS or not isinstance(run.get("config"), dict):
        raise FedPGGANError(f"{path}: needs 'kind' ({' or '.join(KINDS)}) and a 'config' object; is this a fedpggan run folder?")
    return run["kind"]
