"""The run's privacy ledger: everything an auditor needs to recompute every epsilon.

Per site: the budget, delta, accountant, mechanism parameters (noise multiplier, sample
rate, clipping norm), the planned number of steps the noise was calibrated for, and per
round the steps taken and the cumulative epsilon. The run-level guarantee is the maximum
over sites (each site's records are protected by that site's own accountant).
"""

from __future__ import annotations

import math
from typing import Any

from fedpggan.io import json_bytes, sha256_json
from fedpggan.privacy.noise import NOISE_DESCRIPTIONS

ASSUMPTIONS = [
    "unit of privacy: one image (record) at one site; add/remove adjacency",
    "each site's (epsilon, delta) covers its release and every D step it took in this run (its accountant history "
    "survives rounds, crashes and --resume); other runs on the same records are not included: they compose",
    "site record counts are public: they set the sample rate recorded here (so the add/remove accounting bounds "
    "what everything but the count reveals; `fedpggan audit` also reports each site's epsilon under replace-one "
    "adjacency, which holds with the counts public)",
    "the class prior used for fake labels is public (uniform or given by the user), never the private label counts",
    "generator training and everything the server does touch no real data: post-processing of DP outputs",
]


# A site's round recorded after the checkpoint a federated resume continues from: spent, then redone.
SPENT_BEFORE_RESUME = "spent_before_resume"
STATUS_EVENTS = ("budget_exhausted", "excluded")  # the events after which the server selects a site no more


def spent_outside_rounds(event: dict[str, Any]) -> bool:
    """Whether ``event`` stands for spend the site's recorded rounds do not hold: a round it reserved
    and never delivered, or one recorded before a resume and not replayed since."""
    return event.get("event") in ("failed", "no_reply", "excluded", "unrecorded_spend") or (
        event.get("event") == SPENT_BEFORE_RESUME and not event.get("replayed"))


def unreported_round(entry: dict[str, Any]) -> int | None:
    """The round of a site's failed, unanswered or excluded round that no later report covers, if any.

    A site reserves a round's spend before it touches its data, so a round whose reply never came
    back may have been spent; a later reply's cumulative epsilon covers it, but when none follows,
    the site's recorded epsilon is too low by up to that round. An excluded reply's own claim is no
    report: its spend did not match the plan, so it may understate what the site spent. Round numbers
    repeat after a resume: a report recorded before a resume (a ``spent_before_resume`` event) covers
    only failures from before it (marked ``before_resume``), never one in a round redone since."""
    rounds, events = (x if isinstance(x := entry.get(key), list) else [] for key in ("rounds", "events"))
    recorded = [n for r in rounds if isinstance(r, dict) and (n := _round_number(r)) is not None]
    before_resume = [(n, e.get("before_resume")) for e in events if isinstance(e, dict) and e.get("event") == SPENT_BEFORE_RESUME
                     and e.get("epsilon") is not None and (n := _round_number(e)) is not None]
    pending = []
    for e in events:
        if not isinstance(e, dict) or e.get("event") not in ("failed", "no_reply", "excluded"):
            continue
        if (n := _round_number(e)) is None:
            continue
        if marker := e.get("before_resume"):
            # lost before a resume, after its checkpoint: a round recorded since (the same number redone counts) or a
            # later report of that same stretch covers it
            covered = any(m >= n for m in recorded) or any(m > n and seen == marker for m, seen in before_resume)
        else:
            covered = any(m > n for m in recorded)
        if not covered:
            pending.append(n)
    return max(pending, default=None)


def _round_number(item: dict[str, Any]) -> int | None:
    n = item.get("round")  # the audit reads ledgers that may be damaged: anything but an int is not a round here
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def epsilon_bound(entry: dict[str, Any]) -> float | None:
    """What the guarantee may state for a site: its recorded epsilon, or its budget while a round may
    have been spent unreported (:func:`unreported_round`). Sound because a site refuses any round that
    would take it past its budget."""
    eps, budget = entry.get("epsilon"), entry.get("budget_epsilon")
    if not _is_number(eps) or unreported_round(entry) is None:
        return eps
    return max(eps, budget) if _is_number(budget) else math.inf


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class PrivacyLedger:
    """In-memory ledger, written atomically to ``privacy_ledger.json`` after every change
    (by the run folder, which records its hash in run.json in the same step)."""

    def __init__(self, run_id: str, dp: bool, versions: dict[str, str], mechanism: str, config: dict[str, Any],
                 extra_assumptions: list[str] | None = None, noise_key: str = "secret") -> None:
        self.data: dict[str, Any] = {
            "format": 1,
            "run_id": run_id,
            "dp": dp,
            # run.json's options as the run started: run.json itself is not hashed, so the audit
            # compares its options with this (fedpggan.audit.runner.check_config)
            "config_sha256": sha256_json(config),
            "mechanism": mechanism,
            "noise_key": noise_key if dp else None,  # "seed": the noise can be regenerated (fedpggan.privacy.noise)
            "assumptions": [*ASSUMPTIONS, f"noise: {NOISE_DESCRIPTIONS[noise_key]}", *(extra_assumptions or [])] if dp
            else ["NO differential privacy: this run trained D on real data without DP-SGD"],
            "versions": versions,
            "sites": {},
            "checkpoints": [],
            "guarantee": {},
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> "PrivacyLedger":
        ledger = cls.__new__(cls)
        ledger.data = data
        return ledger

    def site(self, site_id: str) -> dict[str, Any]:
        return self.data["sites"][site_id]

    def register_site(self, site_id: str, **mechanism: Any) -> None:
        """First contact with a site: its budget and mechanism (noise multiplier, q, C, ...)."""
        entry = self.data["sites"].setdefault(site_id, {"rounds": [], "events": [], "status": "active", "epsilon": 0.0})
        entry.update(mechanism)

    def record_round(self, site_id: str, round_num: int, **spend: Any) -> None:
        """A round a site trained in: steps, mechanism, cumulative epsilon (as the site reported)."""
        entry = self.site(site_id)
        entry["rounds"].append({"round": round_num, **spend})
        epsilon = spend.get("epsilon", entry["epsilon"])
        # a site's epsilon only grows: a later, lower report (a broken or lying site) lowers nothing; None: no DP
        entry["epsilon"] = None if epsilon is None or entry["epsilon"] is None else max(entry["epsilon"], epsilon)

    def record_event(self, site_id: str, round_num: int, event: str, reason: str, status: str | None = None) -> None:
        entry = self.data["sites"].setdefault(site_id, {"rounds": [], "events": [], "status": "active", "epsilon": 0.0})
        entry["events"].append({"round": round_num, "event": event, "reason": reason})
        if status:
            entry["status"] = status

    def resume_after(self, round_num: int, when: str) -> None:
        """A federated resume continues from the checkpoint of ``round_num`` and redoes the rounds
        after it. Their spend stays: each later ledger round becomes a ``spent_before_resume`` event
        with its steps and epsilon (marked ``replayed`` once the site re-sends that very reply, its
        spend then recorded again); later events stay as history (``before_resume``); a status set
        after the checkpoint is active again (the redone round decides anew: a site still refuses
        past its budget); later checkpoints are discarded (a redone round writes its own under the
        same name)."""
        for site in self.data["sites"].values():
            for event in site["events"]:
                if int(event["round"]) > round_num:
                    event.setdefault("before_resume", when)
            for r in [r for r in site["rounds"] if int(r["round"]) > round_num]:
                site["rounds"].remove(r)
                site["events"].append({"round": r["round"], "event": SPENT_BEFORE_RESUME, "steps": int(r["steps"]),
                                       "epsilon": r.get("epsilon"), "before_resume": when,
                                       "reason": f"recorded after checkpoint round {round_num}, then redone after the "
                                                 "resume (spent once more only if the site could not replay its reply)"})
            if site.get("status") != "active" and not any(
                    e["event"] in STATUS_EVENTS and int(e["round"]) <= round_num for e in site["events"]):
                site["status"] = "active"
        for c in self.data["checkpoints"]:
            if c["round"] > round_num and not c.get("discarded"):  # newer ones the resume could not use
                c["discarded"] = f"missing or failing its hash at the resume of {when}"

    def mark_replayed(self, site_id: str, round_num: int) -> None:
        """The site re-sent (or recomputed under its reservation) a round it had spent before a
        resume: that spend is in its recorded rounds again."""
        for event in self.site(site_id)["events"]:
            if event["event"] == SPENT_BEFORE_RESUME and int(event["round"]) == round_num:
                event["replayed"] = True

    def record_checkpoint(self, round_num: int, file: str, sha256: str) -> None:
        self.data["checkpoints"].append({"round": round_num, "file": file, "sha256": sha256})

    def discard_checkpoint(self, round_num: int, reason: str) -> None:
        """A listed checkpoint a resume could not use (missing or failing its hash): it stays listed,
        marked, so the audit can tell it from one deleted behind the trainer's back."""
        for entry in self.data["checkpoints"]:
            if entry["round"] == round_num:
                entry.setdefault("discarded", reason)

    def content(self) -> bytes:
        """The ledger file's bytes, with the run-level guarantee brought up to date. Written by
        :meth:`fedpggan.runs.RunFolder.save_ledger`, together with run.json's record of its hash."""
        self.update_guarantee()
        return json_bytes(self.data)

    def update_guarantee(self) -> None:
        """The run-level guarantee: the maximum over sites of their epsilon bound (:func:`epsilon_bound`)."""
        sites = self.data["sites"].values()
        eps = [epsilon_bound(s) for s in sites if s.get("epsilon") is not None]
        self.data["guarantee"] = {
            "epsilon": finite_or_none(max(eps)) if eps and self.data["dp"] else None,
            "delta": max((s.get("delta", 0.0) for s in sites), default=None) if self.data["dp"] else None,
            "meaning": "every site's records are (epsilon, delta)-DP w.r.t. everything released" if self.data["dp"] else "no DP guarantee",
        }
        unreported = {site: n for site, s in self.data["sites"].items() if (n := unreported_round(s)) is not None}
        if unreported and self.data["dp"]:
            self.data["guarantee"]["counted_at_budget"] = {
                "sites": unreported, "why": "each listed site's round (the value) failed, went unanswered or was excluded "
                                            "after its last reported round and may have been spent: the site is counted at "
                                            "its budget"}
