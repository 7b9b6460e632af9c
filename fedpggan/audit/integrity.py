"""Are the files the ledger vouches for the files on disk?

- run.json records the ledger's SHA-256 at its last write (and, while a write is under way,
  the one it replaces, so a run killed mid-write still verifies): a different hash means the
  ledger was edited afterwards; the ledger records the hash of run.json's options as the run
  started, so an edited option (say, the noise key) is caught too;
- every checkpoint the ledger lists still has that hash, or is gone because retention deleted
  it, or was marked discarded by a resume that found it missing or corrupt (both reported, not
  a failure: the spend of its epochs stays charged, and nothing uses its weights); retention
  keeps the newest --keep-checkpoints, so one of those missing was deleted by something else: a
  failure, since the folder is no longer what the trainer wrote and an export would silently
  fall back to an older model; a checkpoint file on disk the ledger does not list was not
  produced by this run's trainer, unless the run stopped while writing it (in a running run, the
  file of the last round the ledger charged, newer than every listed one and in no index:
  reported, not a failure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpggan.audit.findings import Finding
from fedpggan.audit.records import as_list, number
from fedpggan.config import RunConfig, flag
from fedpggan.io import sha256_file, sha256_json
from fedpggan.runs import RESUME_MAY_CHANGE, RunFolder
from pggan_model.checkpoint import read_checkpoint


def check_ledger_hash(run: dict[str, Any], folder: RunFolder, actual: str) -> list[Finding]:
    """The ledger that was read (SHA-256 ``actual``) is the one run.json vouches for."""
    recorded = run.get("ledger_sha256")
    if not isinstance(recorded, str):
        return [Finding("run.json:ledger_sha256", "missing: the ledger cannot be shown to be the one the trainer wrote")]
    if not folder.ledger_vouched_for(run, actual):
        return [Finding("run.json:ledger_sha256", f"{folder.ledger_json.name} hashes to {actual[:12]}..., run.json "
                                                  f"recorded {recorded[:12]}...: the ledger was changed after the run wrote it")]
    return []


def check_config(run: dict[str, Any], ledger: dict[str, Any]) -> list[Finding]:
    """run.json's options are those the ledger recorded at the start (a ledger written before
    2026-12-05 records none, and its run's options are taken as they are)."""
    recorded = ledger.get("config_sha256")
    if recorded is None or sha256_json(run.get("config")) == recorded:
        return []
    return [Finding("run.json:config", "the options in run.json are not those the run started with (the ledger records "
                                       "another hash): run.json was edited after the run wrote it; restore it from backup")]


def check_config_in_checkpoint(run: dict[str, Any], folder: RunFolder, rows: list[dict[str, Any]]) -> list[Finding]:
    """run.json's options agree with those the newest verified checkpoint was written with
    (where it lies aside: ``out``, and what a resume may change: where the data lie, whose content
    the resume checked, and the device). The checkpoint's hash is in the ledger, so changing its
    options would mean rewriting the checkpoint, its hash and the ledger's hash as well."""
    verified = [r for r in rows if r["status"] == "verified"]
    if not verified:
        return []
    saved = read_checkpoint(folder.checkpoints / verified[-1]["file"]).get("run_config") or {}
    config = run.get("config") or {}
    aside = {"out", *map(flag, RESUME_MAY_CHANGE)}
    differ = sorted(k for k in set(saved) & set(config) - aside if saved[k] != config[k])
    # an option the checkpoint was written without was added to run.json since (e.g. noise-key in a run
    # saved before that option existed, whose ledger records no options hash to catch it)
    differ += sorted(set(config) - set(saved) - aside)
    if not differ:
        return []
    return [Finding("run.json:config", f"{', '.join(differ)} in run.json differ from the options "
                                       f"checkpoints/{verified[-1]['file']} was written with: run.json was edited; "
                                       "restore it from backup")]


def check_checkpoints(ledger: dict[str, Any], run: dict[str, Any], folder: RunFolder) -> tuple[list[dict[str, Any]], list[Finding]]:
    """One status row per listed checkpoint, and the violations."""
    rows, findings = [], []
    listed = set()
    keep = run["config"].get("keep-checkpoints", RunConfig.keep_checkpoints)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        return [], [Finding("run.json:config.keep-checkpoints", f"{keep!r} is not a positive integer: which checkpoints "
                                                                "retention deleted cannot be told")]
    # retention keeps the newest --keep-checkpoints of those a resume did not discard
    rounds = sorted({e.get("round") for e in ledger.get("checkpoints", [])
                     if isinstance(e, dict) and isinstance(e.get("round"), int) and not e.get("discarded")})
    kept = set(rounds[-keep:])
    # a federated resume redoes the rounds after its checkpoint and writes their files under the names it discarded
    current = {e.get("file") for e in ledger.get("checkpoints", []) if isinstance(e, dict) and not e.get("discarded")}
    for i, entry in enumerate(ledger.get("checkpoints", [])):
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name:
            findings.append(Finding(f"checkpoints[{i}].file", f"{name!r} is not a checkpoint file name"))
            continue
        listed.add(name)
        path = folder.checkpoints / name
        if entry.get("discarded") and path.exists() and name not in current and sha256_file(path) != entry.get("sha256"):
            status = "HASH MISMATCH"
            findings.append(Finding(f"checkpoints[{i}].sha256", f"checkpoints/{name} was discarded by a resume, and a "
                                                                "file with another content has its name since: remove it"))
        elif entry.get("discarded"):
            status = f"discarded ({entry['discarded']})"
        elif not path.exists() and entry.get("round") not in kept:
            status = "not present (rotated)"
        elif not path.exists():
            status = "MISSING"
            findings.append(Finding(f"checkpoints[{i}].file", f"checkpoints/{name} is missing, but retention keeps the newest "
                                                              f"{keep} (--keep-checkpoints): it was deleted after the run "
                                                              "wrote it; restore it from a backup"))
        elif sha256_file(path) == entry.get("sha256"):
            status = "verified"
        else:
            status = "HASH MISMATCH"
            findings.append(Finding(f"checkpoints[{i}].sha256", f"checkpoints/{name} does not have the hash the ledger "
                                                                "recorded: the file was replaced or altered"))
        rows.append({"round": entry.get("round"), "file": name, "status": status})
    last_spend = max((number(r.get("round")) or 0 for s in ledger.get("sites", {}).values() if isinstance(s, dict)
                      for r in as_list(s.get("rounds")) if isinstance(r, dict)), default=None)
    indexed = {e.get("file") for e in folder.checkpoint_index()}
    if folder.checkpoints.is_dir():
        for path in sorted(folder.checkpoints.glob("*.pt")):
            if path.name in listed:
                continue
            round_num = RunFolder.checkpoint_round(path.name)
            if (run.get("status") == "running" and path.name not in indexed and round_num is not None
                    and round_num == last_spend and round_num > max(rounds, default=0)):
                # written just before a kill, before the ledger could list it: nothing uses it, and a resume
                # writes that round again (simulate) or sets the file aside (train)
                rows.append({"round": round_num, "file": path.name, "status": "not recorded (the run stopped while writing it)"})
            else:
                findings.append(Finding("checkpoints", f"checkpoints/{path.name} is not listed in the ledger"))
    return rows, findings
