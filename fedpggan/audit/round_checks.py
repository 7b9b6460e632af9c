"""Is each site's round sequence a plausible, complete record of its training?

- rounds increase by one with no gap, unless an event of the site at that round explains
  it ("failed", "no_reply", ...); the sequence runs to the last round the run reached, or
  to the round the site left the run (budget exhausted, excluded); with --fraction < 1 the
  server records a "not_selected" event for every site it did not pick;
- a site trains no more once it declares its budget exhausted;
- cumulative epsilons never decrease, and the site's epsilon is its last round's (or the larger claim a
  resume kept in a spent_before_resume event).
"""

from __future__ import annotations

from fedpggan.audit.findings import Finding, close
from fedpggan.audit.records import RunFacts, Site, number
from fedpggan.privacy.ledger import SPENT_BEFORE_RESUME, spent_outside_rounds

EXHAUSTED = ("budget_exhausted", "exhausted")
LEFT = (*EXHAUSTED, "excluded")  # the server selects such a site no more
# Events that stand for a round the site has no recorded round for (server/federated_run.py writes them).
EXPLAINS_GAP = ("not_selected", "failed", "no_reply", *LEFT, SPENT_BEFORE_RESUME)
# Events that accompany a recorded round, or stand for none (round 0).
OTHER_EVENTS = ("replayed", "recovered", "rejected_update", "unrecorded_spend", "rejected_release",
                "left_out_of_secure_release")


def first_event(site: Site, names: tuple[str, ...]) -> int | None:
    rounds = [int(number(e.get("round")) or 0) for e in site.events if e.get("event") in names]
    return min(rounds) if rounds else None


def check_rounds(site: Site, facts: RunFacts) -> tuple[list[Finding], list[str]]:
    """Violations and notes about the site's round sequence."""
    p, out, notes = site.prefix, [], []
    numbers = [r.round for r in site.rounds]
    if any(b <= a for a, b in zip(numbers, numbers[1:])):
        out.append(Finding(f"{p}.rounds", f"round numbers {numbers} are not strictly increasing"))
    exhausted = first_event(site, EXHAUSTED)
    late = [n for n in numbers if exhausted is not None and n >= exhausted]
    if late:
        out.append(Finding(f"{p}.rounds", f"trained in round(s) {late} after declaring budget_exhausted in round {exhausted}"))
    unknown = sorted({str(e.get("event")) for e in site.events} - set(EXPLAINS_GAP) - set(OTHER_EVENTS))
    if unknown:
        out.append(Finding(f"{p}.events", f"unknown event(s) {', '.join(unknown)}: not written by fedpggan"))
    explained = {int(number(e.get("round")) or 0) for e in site.events if e.get("event") in EXPLAINS_GAP}
    left = first_event(site, LEFT)
    last = min(left - 1, facts.end_round) if left is not None else facts.end_round
    planned = number(facts.config.get("rounds" if facts.kind == "federated" else "epochs"))
    beyond = [n for n in [*numbers, *explained] if planned is not None and n > planned]
    if beyond:
        out.append(Finding(f"{p}.rounds", f"round(s) {spans(sorted(set(beyond)))} beyond the {planned:g} the run planned"))
        last = min(last, int(planned))
    missing = [n for n in range(1, last + 1) if n not in numbers and n not in explained]
    if missing:
        out.append(Finding(f"{p}.rounds", f"round(s) {spans(missing)} missing with no event explaining the gap "
                                          f"(the run reached round {facts.end_round})"))
    unrecorded = sorted(int(number(e.get("round")) or 0) for e in site.events if spent_outside_rounds(e))
    trailing = site.unreported_round
    if trailing is not None:
        notes.append(f"{p}: round {trailing} failed, went unanswered or was excluded after the site's last report; any "
                     "spend reserved then is in no claim it can be held to, so the guarantee counts the site at its budget")
    elif unrecorded:
        notes.append(f"{p}: round(s) {spans(unrecorded)} failed or were excluded; any spend reserved then is not in the "
                     "recorded rounds (the site's later cumulative claims include it)")
    eps = [(r.round, r.epsilon) for r in site.rounds if r.epsilon is not None]
    for (ra, a), (rb, b) in zip(eps, eps[1:]):
        if b < a - 1e-9:
            out.append(Finding(f"{p}.rounds[{numbers.index(rb)}].epsilon",
                               f"cumulative epsilon falls from {a:.4g} (round {ra}) to {b:.4g} (round {rb})"))
    # a round recorded, then redone after a resume, keeps its claim in its event (server/federated_run.py restore)
    redone = [(int(number(e.get("round")) or 0), number(e.get("epsilon"))) for e in site.events
              if e.get("event") == SPENT_BEFORE_RESUME and number(e.get("epsilon")) is not None]
    claims = eps + redone
    if claims and not close(site.epsilon, (last_claim := max(claims, key=lambda c: c[1]))[1]):
        out.append(Finding(f"{p}.epsilon", f"{site.epsilon:.4g}, but the last round ({last_claim[0]}) records {last_claim[1]:.4g}"))
    return out, notes


def spans(numbers: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4, 7' (keeps long gaps readable)."""
    if not numbers:
        return ""
    out, start = [], numbers[0]
    for a, b in zip(numbers, [*numbers[1:], None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else str(a))
            start = b
    return ", ".join(out)
