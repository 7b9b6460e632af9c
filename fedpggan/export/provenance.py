"""Whether a run may be shared, and the facts its datasheet reports.

Export is post-processing of the generator, so the images inherit exactly the run's DP
guarantee -- which is only worth stating if the ledger is intact (its hash matches run.json),
self-consistent, within every site's budget, covers the exported checkpoint, and has been
audited as it is now (the audit's recorded content hashes match). Anything else is refused in
one line before any image is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpggan.audit.runner import audited_content
from fedpggan.errors import FedPGGANError
from fedpggan.io import sha256_file
from fedpggan.privacy.ledger import epsilon_bound
from fedpggan.runs import RunFolder

AUDIT_FILE = "audit.json"
EVALUATION_FILE = "evaluation.json"
# What the datasheet says of an export without a passing audit; the refusals promise the same words.
AUDIT_LABELS = {"unaudited": "UNAUDITED", "failed": "AUDIT FAILED"}


@dataclass(frozen=True)
class Provenance:
    run: dict[str, Any]
    ledger: dict[str, Any]
    checkpoint: Path
    checkpoint_sha256: str
    checkpoint_round: int
    audit: dict[str, Any]            # {"status": "passed" | "failed" | "unaudited", "date", "report", "reason"}
                                     # and, when passed, each site's "replace_one_epsilon" as the audit computed it
    evaluation: dict[str, Any] | None


def verify_run(folder: RunFolder, checkpoint: str | None, allow_unaudited: bool, allow_no_dp: bool,
               audit_report: str | None = None) -> Provenance:
    """Every check an export needs; raises :class:`FedPGGANError` naming the file and the fix.
    ``audit_report`` is where ``fedpggan audit --out`` wrote (default: the run folder)."""
    run = folder.read_run()
    ledger = folder.read_verified_ledger(run, "an export")
    if ledger.get("dp"):
        check_budgets(folder.ledger_json, ledger)
    path, sha, round_num = pick_checkpoint(folder, checkpoint, ledger)
    audit = audit_status(folder, run, audit_report)
    label = AUDIT_LABELS.get(audit["status"])
    if not ledger.get("dp"):
        needed = [flag for flag, given in (("--allow-no-dp", allow_no_dp), ("--allow-unaudited", allow_unaudited)) if not given]
        if needed:
            says = " and ".join(["NO PRIVACY GUARANTEE", *([label] if label else [])])
            raise FedPGGANError(f"{folder.ledger_json}: the run was trained WITHOUT differential privacy, so it has no "
                                f"privacy guarantee and can never pass `fedpggan audit`; to export it anyway pass "
                                f"{' '.join(needed)} (the datasheet will say {says})")
    elif label and not allow_unaudited:
        raise FedPGGANError(f"{audit_report_path(folder, audit_report)}: {audit['reason']} (RUN: {folder.root}); or pass "
                            f"--allow-unaudited to export anyway (the datasheet will say {label})")
    evaluation = folder.read_json(folder.root / EVALUATION_FILE) if (folder.root / EVALUATION_FILE).is_file() else None
    evaluated_run = evaluation.get("run_id") if isinstance(evaluation, dict) else None  # None: written before runs were named
    if evaluated_run is not None and evaluated_run != run.get("run_id"):
        raise FedPGGANError(f"{folder.root / EVALUATION_FILE}: evaluates run {evaluated_run}, not this run "
                            f"({run.get('run_id')}), so the datasheet must not quote it; run `fedpggan evaluate {folder.root}`")
    return Provenance(run, ledger, path, sha, round_num, audit, evaluation)


def check_budgets(path: Path, ledger: dict[str, Any]) -> None:
    """Every site within its budget, and the run-level epsilon equal to the worst site's."""
    sites = ledger.get("sites") or {}
    spent = {site: entry.get("epsilon") for site, entry in sites.items()}
    if not spent or any(not isinstance(e, (int, float)) or math.isnan(e) for e in spent.values()):
        raise FedPGGANError(f"{path}: a DP ledger without a numeric epsilon for every site is inconsistent; "
                            "restore the run's original ledger")
    for site, entry in sites.items():
        budget = entry.get("budget_epsilon")
        if not isinstance(budget, (int, float)) or spent[site] > budget * (1 + 1e-9):
            raise FedPGGANError(f"{path}: site {site} spent epsilon {spent[site]} over its budget {budget}; "
                                "this run's privacy promise is broken and it must not be shared")
    claimed = (ledger.get("guarantee") or {}).get("epsilon")
    worst = max(epsilon_bound(entry) for entry in sites.values())  # a site with unreported spend at its budget
    if not isinstance(claimed, (int, float)) or not math.isclose(claimed, worst, rel_tol=1e-9):
        raise FedPGGANError(f"{path}: guarantee epsilon {claimed} is not the maximum over sites "
                            f"({worst}); the ledger is inconsistent, restore the original")


def pick_checkpoint(folder: RunFolder, spec: str | None, ledger: dict[str, Any]) -> tuple[Path, str, int]:
    """The newest checkpoint, which must verify (an export never falls back to an older model unasked),
    or ``--checkpoint`` FILE|ROUND; the ledger must list it: a checkpoint the ledger does not cover
    has no stated privacy guarantee."""
    if spec is None:
        usable = folder.usable_checkpoints()
        if usable and not folder.verified(usable[-1]):
            older = [str(e["round"]) for e in usable[:-1] if folder.verified(e)]
            fix = (f"or choose an older one with --checkpoint ROUND (rounds that verify: {', '.join(older)})" if older else
                   f"no older one verifies either: restore {folder.checkpoints} from a backup, or train the run again")
            raise FedPGGANError(f"{folder.checkpoints / usable[-1]['file']}: the newest checkpoint (round {usable[-1]['round']}) "
                                f"is missing or fails its hash check; restore it, {fix}")
        path, entry = folder.latest_checkpoint()
        sha = entry["sha256"]
    else:
        path = folder.checkpoint_file(spec)
        sha = sha256_file(path)
    recorded = {c.get("sha256"): c.get("round") for c in ledger.get("checkpoints", [])}
    if sha not in recorded:
        raise FedPGGANError(f"{path}: checkpoint is not recorded in {folder.ledger_json}; "
                            "export a checkpoint this run's ledger covers")
    return path, sha, recorded[sha]


def audit_report_path(folder: RunFolder, spec: str | None) -> Path:
    """RUN/audit.json, or ``--audit-report``: an audit.json or the folder ``fedpggan audit --out`` wrote."""
    if spec is None:
        return folder.root / AUDIT_FILE
    path = Path(spec).expanduser()
    path = path / AUDIT_FILE if path.is_dir() else path
    if not path.is_file():
        raise FedPGGANError(f"--audit-report {spec}: no {AUDIT_FILE} there; give the file or the folder that "
                            f"`fedpggan audit {folder.root} --out DIR` wrote")
    return path


def audit_status(folder: RunFolder, run: dict[str, Any], spec: str | None = None) -> dict[str, Any]:
    """What ``fedpggan audit`` concluded about the run *as it is now*: a verdict counts only while
    the ledger and options it audited (their hashes, in audit.json) are the run's current ones. The
    reason names the run folder RUN, not its path: it goes into the datasheet, which travels with the data."""
    path = audit_report_path(folder, spec)
    audit = folder.read_json(path) if path.is_file() else None
    # the report by name, inside the run when it is there: the datasheet carries no path of the site's
    report = str(path.relative_to(folder.root)) if path.is_relative_to(folder.root) else path.name
    status = {"status": "unaudited", "date": None, "report": report, "reason": None}
    if audit is None:
        return {**status, "reason": "is missing; run `fedpggan audit RUN` (an audit written with "
                                    "--out DIR: pass --audit-report DIR)"}
    if not isinstance(audit, dict):
        return {**status, "reason": "is not a `fedpggan audit` report; run `fedpggan audit RUN`"}
    status["date"] = audit.get("date")
    if audit.get("content") != audited_content(folder, run):
        what = ("records no content hashes (written by an older fedpggan)" if "content" not in audit else
                "audited other content than this run's ledger, options and description now (the run changed since, or the "
                "report is another run's)")
        return {**status, "reason": f"{what}; run `fedpggan audit RUN` again"}
    if audit.get("passed") is not True:
        found = [f"{v.get('field')}: {v.get('reason')}" for v in audit.get("violations") or [] if isinstance(v, dict)]
        more = f" (and {len(found) - 1} more in its AUDIT.md)" if len(found) > 1 else ""
        return {**status, "status": "failed", "violations": found,
                "reason": f"says the audit FAILED ({status['date']})" + (f": {found[0]}{more}" if found else "")}
    replace_one = {str(site): float(row["replace_one_epsilon"]) for site, row in (audit.get("sites") or {}).items()
                   if isinstance(row, dict) and type(row.get("replace_one_epsilon")) in (int, float)}
    return {**status, "status": "passed", "replace_one_epsilon": replace_one}  # empty from an audit before 2026-12-06
