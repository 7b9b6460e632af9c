"""Recompute each site's epsilon and judge the ledger's claims against it.

Decision rule: RULE below. Why the minimum over accountants: each one is a valid upper bound
on the true epsilon of the recorded mechanism, so the true guarantee is at most their minimum;
a claim below it is an under-report no analysis supports, while a claim between the minimum
and the declared accountant's value is still sound. The same under-report rule is applied to
the cumulative epsilon of sampled rounds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tqdm import tqdm

from fedpggan.audit import accountants
from fedpggan.audit.findings import Finding, exceeds, falls_short
from fedpggan.audit.records import Site, number
from fedpggan.privacy.ledger import epsilon_bound, spent_outside_rounds

RULE = (
    "Every accountant (RDP, PRV, PLD) gives a valid upper bound on the true epsilon, so the tightest sound "
    "statement is their minimum ('tightest'). FAIL if the claimed epsilon is below 'tightest' (no accountant "
    "supports the claim: under-report), if 'tightest' exceeds the budget, or if the site claims more than its budget, "
    "each by more than float rounding (an honest claim is the declared accountant's value on the same history, and a "
    "site refuses a round that would take it past its budget). A claim below the declared accountant's "
    "value but still >= 'tightest' is a note (the guarantee holds, it does not reproduce with the accountant "
    "named). Every accountant reads the recorded rounds plus the steps the ledger records as spent outside them "
    "(unrecorded_spend, spent_before_resume not replayed, an excluded site's reported total). A claim above the "
    "declared accountant's value means spend is missing from the rounds: FAIL, unless a failed/no_reply/excluded "
    "event explains unrecorded spend. 'replace-one' is "
    "the same rounds' epsilon (PLD) under replace-one adjacency (over every planned step when such an event left "
    "spend unrecorded), the sound reading when record counts are public; it is reported, not judged, since the "
    "budgets are stated under add/remove adjacency."
)
CURVE_POINTS = 5  # rounds (last included) at which the declared accountant is recomputed


def audit_spend(site: Site) -> tuple[dict[str, Any], list[Finding], list[str]]:
    """The site's table row, its violations and its notes."""
    p, findings, notes = site.prefix, [], []
    values, errors = accountants.recompute(site.history, site.delta)
    row: dict[str, Any] = {
        "site": site.site_id, "status": site.status, "budget_epsilon": site.budget_epsilon, "delta": site.delta,
        "declared_accountant": site.accountant, "claimed_epsilon": site.epsilon, "recomputed": values,
        "accountant_errors": errors, "noise_multiplier": site.noise_multiplier, "sample_rate": site.sample_rate,
        "steps": sum(r.steps for r in site.rounds), "unrecorded_steps": site.unrecorded_steps,
        "planned_steps": site.planned_steps, "rounds_trained": len(site.rounds),
    }
    if not values:
        return row, [Finding(f"{p}.epsilon", f"no accountant could recompute it ({errors})")], notes
    tightest_name = min(values, key=values.get)
    tightest = values[tightest_name]
    row.update(tightest_epsilon=tightest, tightest_accountant=tightest_name)
    row.update(replace_one(site, notes))
    # a round lost after the site's last report may have been spent: the guarantee states the site's budget
    claim = site.epsilon if site.unreported_round is None else max(site.epsilon, site.budget_epsilon)
    if falls_short(claim, tightest):
        findings.append(Finding(f"{p}.epsilon", f"claimed {claim:.4g} is below the tightest recomputed bound "
                                                f"{tightest:.4g} ({tightest_name}): under-reported"))
    if exceeds(tightest, site.budget_epsilon):
        findings.append(Finding(f"{p}.budget_epsilon", f"recomputed epsilon {tightest:.4g} ({tightest_name}) exceeds "
                                                       f"the budget {site.budget_epsilon:g}"))
    if exceeds(site.epsilon, site.budget_epsilon):
        findings.append(Finding(f"{p}.epsilon", f"claimed {site.epsilon:.4g} exceeds the budget {site.budget_epsilon:g}"))
    declared = values.get(site.accountant)
    if declared is not None and (falls_short(claim, declared) or exceeds(claim, declared)):
        if claim < declared:
            if not falls_short(claim, tightest):
                notes.append(f"{p}.epsilon: claimed {claim:.4g} is below the declared accountant "
                             f"({site.accountant}: {declared:.4g}) but supported by {tightest_name} ({tightest:.4g})")
        elif any(spent_outside_rounds(e) for e in site.events):
            notes.append(f"{p}.epsilon: claimed {claim:.4g} is above the recorded rounds' {declared:.4g} "
                         f"({site.accountant}); failed/excluded rounds explain the difference")
        else:
            findings.append(Finding(f"{p}.rounds", f"the recorded rounds spend epsilon {declared:.4g} ({site.accountant}), "
                                                   f"the site claims {claim:.4g}: spend is missing from the rounds"))
    row["curve"], curve_findings = _curve(site, values)
    return row, findings + curve_findings, notes


def replace_one(site: Site, notes: list[str]) -> dict[str, Any]:
    """The site's epsilon under replace-one adjacency (what the rounds give if a record's swap, not
    its presence, must stay hidden) and what it was computed over: the recorded rounds, or, when
    events explain spend the rounds do not record (a failed or excluded round), the release and
    every planned step, an upper bound since a site never trains past its plan."""
    unrecorded = any(spent_outside_rounds(e) for e in site.events)
    history = (site.release_history + ((site.noise_multiplier, site.sample_rate, site.planned_steps),)
               if unrecorded else site.history)
    try:
        return {"replace_one_epsilon": accountants.replace_one_epsilon(history, site.delta),
                "replace_one_basis": "planned steps (unrecorded spend)" if unrecorded else "recorded rounds"}
    except Exception as exc:  # informational: a failure is reported, not a violation
        notes.append(f"{site.prefix}.replace_one_epsilon: could not be computed ({type(exc).__name__}: {exc})")
        return {}


def _curve(site: Site, final: dict[str, float]) -> tuple[dict[str, Any], list[Finding]]:
    """Claimed and recomputed cumulative epsilon per round (RDP every round, the declared
    accountant at up to CURVE_POINTS rounds) and the rounds whose claim is under-reported."""
    rounds = site.rounds
    parts = [((r.noise_multiplier, r.sample_rate, r.steps),) for r in rounds]
    if parts:  # the release was spent before round 1
        parts[0] = (*site.release_history, *parts[0])
    rdp = accountants.rdp_curve(parts, site.delta)
    picks = sorted({round(i * (len(rounds) - 1) / max(CURVE_POINTS - 1, 1)) for i in range(CURVE_POINTS)}) if rounds else []
    declared: dict[int, float] = {}
    findings = []
    for i in picks:
        value = final.get(site.accountant) if i == len(rounds) - 1 else _declared(site, i)
        if value is None:
            continue
        declared[rounds[i].round] = value
        claim = rounds[i].epsilon
        # The last round's claim is the site's, judged against all accountants in audit_spend.
        if claim is not None and i < len(rounds) - 1 and falls_short(claim, min(value, rdp[i])):
            findings.append(Finding(f"{site.prefix}.rounds[{i}].epsilon", f"round {rounds[i].round} claims {claim:.4g}, "
                                                                          f"recomputed {min(value, rdp[i]):.4g}: under-reported"))
    curve = {"round": [r.round for r in rounds], "claimed": [r.epsilon for r in rounds], "rdp": rdp,
             f"{site.accountant}_points": declared}
    return curve, findings


def _declared(site: Site, i: int) -> float | None:
    # the rounds up to i only: when the spend outside them happened is not recorded, so the final value counts it
    prefix = dataclasses.replace(site, rounds=site.rounds[: i + 1], events=[])
    try:
        return accountants.epsilon(site.accountant, prefix.history, site.delta)
    except Exception:  # reported for the final value already
        return None


def audit_sites(sites: list[Site]) -> tuple[dict[str, dict[str, Any]], list[Finding], list[str]]:
    rows, findings, notes = {}, [], []
    for site in tqdm(sites, desc="recomputing epsilon", unit="site", disable=len(sites) < 2):
        row, f, n = audit_spend(site)
        rows[site.site_id] = row
        findings += f
        notes += n
    return rows, findings, notes


def check_guarantee(ledger: dict[str, Any]) -> list[Finding]:
    """guarantee.epsilon / .delta are the maxima over the sites' bounds (fedpggan.privacy.ledger.epsilon_bound) and deltas."""
    sites = [s for s in ledger.get("sites", {}).values() if isinstance(s, dict)]
    guarantee = ledger.get("guarantee") if isinstance(ledger.get("guarantee"), dict) else {}
    out = []
    for key in ("epsilon", "delta"):  # a site with a spend it could not report counts at its budget
        values = [v for v in (number(epsilon_bound(s) if key == "epsilon" else s.get(key)) for s in sites) if v is not None]
        claimed = number(guarantee.get(key))
        # only a guarantee below the bound is wrong: one above it (a ledger written under a stricter counting rule) is safe
        if values and (claimed is None or claimed < max(values) - 1e-9 * max(1.0, max(values))):
            out.append(Finding(f"guarantee.{key}", f"{guarantee.get(key)!r}, but the maximum over sites is {max(values):.6g}"))
    return out
