"""What all runs on a site's records have spent together: the lifetime caps' arithmetic.

The lifetime caps (``max-total-epsilon``, ``max-total-delta``) count the runs in the site's
state dir. A state dir restored from an older backup forgets the runs made since, and the
site could then spend their budget again. The optional spend journal is an append-only file
of one JSON line per reservation, kept on another volume (``spend-journal`` in the site
config): the caps count every run it names, whether or not the state dir still holds it. It
also gets one line per DP round, the run's step total, before the round is reserved: a run's
state restored from a copy taken mid-run would otherwise spend the rounds since once more
(client/site_round.py counts them again from the journal); and one line before a run's release
is drawn (``{"run", "release": "drawn", "time"}``), so that a site whose state of a run is lost
refuses to start the run over with a second release (client/site_round.py, ensure_noise_key).

Privacy assumptions: basic composition across runs (their epsilons add up, and so do their
deltas); the journal and the state dir are not both rolled back to the same older copy; a run
counts at the largest (epsilon, delta) either of them recorded for it.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from fedpggan.errors import FedPGGANError

Budgets = dict[str, tuple[float, float]]


def reserved_budgets(root: Path) -> Budgets:
    """Each run's (epsilon, delta) in the state dir ``root`` that counts towards the lifetime
    caps: what it reserved, or, for a run that spent before it could reserve, its budget. Read
    from the files as they are, without loading each run's state (another run's own problems
    are its own). A run that reserved before deltas were reserved counts at its mechanism's
    delta, or at 1 (no guarantee) when it has none; a run that trained without DP counts as
    (infinite, 1), even one made while the site had no cap."""
    budgets = {}
    for path in sorted(root.glob("*/site_state.json")):
        try:
            data = json.loads(path.read_text())
            budget = _counted_budget(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise FedPGGANError(f"{path}: unreadable ({exc}); the lifetime cap cannot count that run's spend: restore "
                                "the file from backup", shared="the state of another run at this site is unreadable, so "
                                "its lifetime cap cannot be checked; the site's log names it") from None
        if budget is not None:
            budgets[path.parent.name] = budget
    return budgets


# The fields of client.site.SiteState this module reads from each run's site_state.json (a test holds them
# to SiteState's: a renamed field would read as nothing spent).
STATE_FIELDS_READ = ("trained_without_dp", "budget_epsilon", "history", "lifetime_reserved", "lifetime_reserved_delta",
                     "delta")


def _counted_budget(data: dict) -> tuple[float, float] | None:
    """One run's counted (epsilon, delta) from its site_state.json, or None if it reserved and spent nothing."""
    if data.get("trained_without_dp"):  # whatever it reserved: its records were read without DP
        return math.inf, 1.0
    spent = data.get("budget_epsilon") if data.get("history") else None
    counted = [checked(eps, "epsilon") for eps in (data.get("lifetime_reserved"), spent) if eps is not None]
    if not counted:
        return None
    delta = data.get("lifetime_reserved_delta") or data.get("delta")
    return max(counted), 1.0 if delta is None else checked(delta, "delta")


def checked(value: object, name: str) -> float:
    """A recorded epsilon or delta as a float; NaN or a negative value, which no cap comparison can
    count, is refused (ValueError) rather than read as nothing spent."""
    number = float(value)  # type: ignore[arg-type]
    if not number >= 0:
        raise ValueError(f"{name} {value!r} is not a number >= 0")
    return number


def passes_cap(used: float, asked: float, cap: float) -> bool:
    """Whether ``asked`` on top of ``used`` passes a lifetime cap; relative slack only for rounding (deltas ~1e-5)."""
    return used + asked > cap * (1 + 1e-9)


def merge_budgets(state_dir_budgets: Budgets, journal_budgets: Budgets) -> Budgets:
    """Every run either record names, at the larger epsilon and the larger delta of the two."""
    merged = dict(state_dir_budgets)
    for run, (epsilon, delta) in journal_budgets.items():
        old = merged.get(run, (0.0, 0.0))
        merged[run] = (max(old[0], epsilon), max(old[1], delta))
    return merged


def journal_lines(path: Path) -> list[str]:
    """The journal's lines; a missing file has none (no reservation made yet)."""
    try:
        return path.read_text().splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a text file: the path names some other file"
        raise FedPGGANError(f"spend-journal {path}: cannot read ({why}); fix its permissions or the "
                            "'spend-journal' path in the site config") from None


def read_spend_journal(path: str | Path) -> Budgets:
    """Each run's largest reserved (epsilon, delta) in the journal; a missing file is empty
    (no reservation made yet), a line that cannot be read is a one-line error."""
    path = Path(path)
    budgets: Budgets = {}
    for number, line in enumerate(journal_lines(path), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if "steps" in entry and "epsilon" not in entry:  # a round's progress line (journal_steps)
                checked(entry["steps"], "steps")
                continue
            if entry.get("release") == "drawn" and "epsilon" not in entry:  # a release line (journal_records_spend)
                continue
            run, epsilon, delta = str(entry["run"]), checked(entry["epsilon"], "epsilon"), checked(entry["delta"], "delta")
        except (ValueError, KeyError, TypeError) as exc:
            raise FedPGGANError(f"spend-journal {path}, line {number}: unreadable ({exc}); the lifetime caps cannot count "
                                "that run: restore the file from backup (never delete lines from it)") from None
        old = budgets.get(run, (0.0, 0.0))
        budgets[run] = (max(old[0], epsilon), max(old[1], delta))
    return budgets


JOURNAL_USED = ".spend-journal-used"  # marker in a state dir that has written to its spend journal


def check_journal_present(journal: str | Path, state_dir: Path) -> None:
    """Once ``state_dir`` has written to its journal, a missing journal is refused: a volume not
    mounted would otherwise read as a fresh journal and forget every run and round it recorded."""
    if not Path(journal).exists() and (state_dir / JOURNAL_USED).exists():
        raise FedPGGANError(f"spend-journal {journal}: missing, but state dir {state_dir} has written to it before "
                            f"({JOURNAL_USED}): mount its volume or restore it from backup; never start it afresh",
                            shared="this site's spend journal is missing; the site's log says what to restore")


def journal_entries(path: str | Path, run: str) -> list[dict]:
    """The journal's progress and release lines of ``run`` (its reservations are read_spend_journal's)."""
    entries = []
    for line in journal_lines(Path(path)):
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # read_spend_journal reports unreadable lines
        if isinstance(entry, dict) and entry.get("run") == run and "epsilon" not in entry:
            entries.append(entry)
    return entries


def journal_steps(path: str | Path, run: str) -> int:
    """The largest step total the journal's progress lines record for ``run`` (0: none)."""
    return max((int(checked(entry.get("steps", 0), "steps")) for entry in journal_entries(path, run)), default=0)


def journal_records_spend(path: str | Path, run: str) -> bool:
    """Whether the journal records that ``run`` spent at this site: a drawn release or DP steps."""
    return any(entry.get("release") == "drawn" or entry.get("steps", 0) for entry in journal_entries(path, run))


def append_progress(path: str | Path, run: str, steps: int) -> None:
    """Append a run's DP step total before the round that brings it there is reserved in the
    state dir (fsynced first: a crash in between counts more, never less)."""
    append_line(path, {"run": run, "steps": steps, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def append_release_drawn(path: str | Path, run: str) -> None:
    """Append that ``run``'s one-shot release is about to be drawn (fsynced first): a state dir that
    then loses the run cannot start it over with a second release the journal would not count."""
    append_line(path, {"run": run, "release": "drawn", "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def append_reservation(path: str | Path, run: str, epsilon: float, delta: float) -> None:
    """Append one reservation and fsync it before the caller records it in the state dir, so a
    crash in between leaves the journal counting more, never less."""
    append_line(path, {"run": run, "epsilon": epsilon if math.isfinite(epsilon) else "inf", "delta": delta,
                       "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def append_line(path: str | Path, entry: dict) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise FedPGGANError(f"spend-journal {path}: cannot append ({exc.strerror}); the run reserves nothing until it "
                            "can: fix the volume or the 'spend-journal' path in the site config") from None
