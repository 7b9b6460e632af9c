"""``audit_run``: every check on one run folder, the verdict, and the written report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpggan.audit import accountants, integrity, report
from fedpggan.audit.findings import ABS_TOL, FLOAT_TOL, REL_TOL, Finding
from fedpggan.audit.mechanism_checks import check_mechanism
from fedpggan.audit.mia import MiaOptions, run_mia
from fedpggan.audit.records import RunFacts, Site, as_list, check_shape, number, parse_site, run_kind
from fedpggan.audit.round_checks import check_rounds
from fedpggan.audit.spend import RULE, audit_sites, check_guarantee
from fedpggan.errors import FedPGGANError
from fedpggan.io import sha256_file, sha256_json
from fedpggan.privacy.noise import SEEDED_NOISE
from fedpggan.runs import RunFolder, now_iso

NO_DP = ("the ledger records no differential privacy (dp: false): there is no (epsilon, delta) guarantee, "
         "so the run cannot pass a privacy audit")


def audit_run(run_dir: str | Path, out: str | Path | None = None, mia: MiaOptions | None = None) -> dict[str, Any]:
    """Audit ``run_dir``; write audit.json, AUDIT.md and audit_epsilon.png to ``out`` (default:
    the run folder). Returns the audit.json content; ``passed`` is the verdict."""
    folder = RunFolder(run_dir)
    run = folder.read_run()
    kind = run_kind(run, str(folder.run_json))
    ledger, ledger_sha256 = folder.read_json_and_sha256(folder.ledger_json)  # the verdict is about these bytes
    check_shape(ledger, str(folder.ledger_json))
    findings = integrity.check_ledger_hash(run, folder, ledger_sha256) + integrity.check_config(run, ledger)
    checkpoints, ckpt_findings = integrity.check_checkpoints(ledger, run, folder)
    findings += ckpt_findings + integrity.check_config_in_checkpoint(run, folder, checkpoints)
    rows: dict[str, Any] = {}
    notes: list[str] = []
    if not ledger["dp"]:
        findings.append(Finding("dp", NO_DP))
    else:
        rows, site_findings, notes = audit_ledger_sites(ledger, run, kind, folder)
        findings += site_findings + check_noise_key(run, ledger, kind, notes, simulated=(folder.root / "partition.json").is_file())
    if run.get("status") != "completed":
        notes.insert(0, f"run status is {run.get('status')!r}: this audits the run as far as it got")
    result: dict[str, Any] = {
        "passed": False, "date": now_iso(), "run": str(folder.root.resolve()), "run_id": run.get("run_id"),
        "kind": kind, "dp": ledger["dp"], "content": audited_content(folder, run, ledger_sha256), "violations": [], "notes": notes, "rule": RULE,
        "tolerance": {"relative": REL_TOL, "absolute": ABS_TOL, "claims_and_budgets": FLOAT_TOL}, "sites": rows, "checkpoints": checkpoints,
        "assumptions": ledger.get("assumptions", []),
        "versions": {"audit": accountants.versions(), "run": ledger.get("versions", {})},
    }
    if mia is not None:
        result["mia"], mia_findings = run_mia(folder, run, rows, mia)
        findings += mia_findings
    result["violations"] = [f.to_json() for f in dict.fromkeys(findings)]  # a config problem is found once per site
    result["passed"] = not findings
    for row in rows.values():
        row["passed"] = not any(f.field.startswith((f"sites.{row['site']}.", f"mia.{row['site']}.")) for f in findings)
    report.write_outputs(result, Path(out) if out else folder.root)
    return result


# run.json's facts besides its options that an export's datasheet states (what the data is, whether the run
# finished): a verdict must not survive an edit of them either.
DESCRIBED_RUN_FIELDS = ("run_id", "kind", "status", "num_sites", "dataset")


def audited_content(folder: RunFolder, run: dict[str, Any], ledger_sha256: str | None = None) -> dict[str, str]:
    """Hashes of what the verdict is about, the ledger (``ledger_sha256``: of the bytes the audit read;
    else the file now), the run's options and the facts a datasheet states from run.json: an export
    (fedpggan/export/provenance.py) trusts a verdict only while the run still has this content."""
    return {"ledger_sha256": ledger_sha256 or sha256_file(folder.ledger_json), "config_sha256": sha256_json(run.get("config", {})),
            "run_facts_sha256": sha256_json({k: run.get(k) for k in DESCRIBED_RUN_FIELDS})}


def check_noise_key(run: dict[str, Any], ledger: dict[str, Any], kind: str, notes: list[str], simulated: bool) -> list[Finding]:
    """A guarantee holds only against whoever cannot regenerate the noise: noise drawn from the
    run's --seed (``--noise-key seed``) fails the audit, whether the hash-checked ledger or
    run.json says so. A run.json older than the option is read as seeded where runs then were:
    centralised and simulated runs (a simulation's folder holds partition.json, a deployed one's never)."""
    noise_key = run["config"].get("noise-key")
    if ledger.get("noise_key") == "seed" or noise_key == "seed" or (noise_key is None and (kind == "centralised" or simulated)):
        return [Finding("config.noise-key", f"{SEEDED_NOISE}; retrain with --noise-key secret")]
    if noise_key is None:
        notes.append("run.json predates --noise-key (2026-12-04): a deployed site of that time drew its DP noise from its "
                     "own secret key")
    return []


def check_site_roster(run: dict[str, Any], sites: list, ledger_ids: set[str]) -> list[Finding]:
    """The ledger holds exactly the sites run.json says took part, with their record counts: a
    site dropped from the ledger would otherwise drop its spend from the guarantee unnoticed."""
    declared = run.get("sites")
    if not isinstance(declared, dict) or run.get("num_sites") != len(declared):
        return [Finding("run.json:sites", f"run.json does not list its {run.get('num_sites')!r} sites with their record "
                                          "counts; restore it from backup")]
    declared = {str(k): v for k, v in declared.items()}
    findings = []
    if set(declared) - ledger_ids:
        findings.append(Finding("sites", f"site(s) {', '.join(sorted(set(declared) - ledger_ids))} of run.json have no "
                                         "ledger entry: their spend is not in the guarantee; restore the run's ledger"))
    if ledger_ids - set(declared):
        findings.append(Finding("sites", f"ledger site(s) {', '.join(sorted(ledger_ids - set(declared)))} are not among "
                                         "run.json's sites"))
    for site in sites:
        if site.site_id in declared and declared[site.site_id] != site.public_num_records:
            findings.append(Finding(f"sites.{site.site_id}.public_num_records",
                                    f"{site.public_num_records} differs from run.json's {declared[site.site_id]!r}"))
    return findings


def audit_ledger_sites(ledger: dict[str, Any], run: dict[str, Any], kind: str,
                       folder: RunFolder) -> tuple[dict[str, Any], list[Finding], list[str]]:
    """Consistency and accounting checks of every DP site, plus the run-level guarantee."""
    findings: list[Finding] = []
    notes: list[str] = []
    sites = []
    for site_id in sorted(map(str, ledger["sites"]), key=lambda s: (not s.isdigit(), s.zfill(12))):
        site, bad = parse_site(site_id, ledger["sites"][site_id])
        findings += bad
        if site is not None:
            sites.append(site)
    if not ledger["sites"]:
        findings.append(Finding("sites", "no site registered a DP mechanism: nothing supports the claimed guarantee"))
    if kind == "federated":
        findings += check_site_roster(run, sites, set(map(str, ledger["sites"])))
    facts = RunFacts(kind=kind, config=run["config"], status=str(run.get("status", "")),
                     num_records=(run.get("dataset") or {}).get("num_records"), end_round=end_round(ledger, run, folder))
    for site in sites:
        round_findings, round_notes = check_rounds(site, facts)
        findings += check_mechanism(site, facts) + round_findings
        notes += round_notes
    rows, spend_findings, spend_notes = audit_sites(sites)
    notes += [collusion_note(site) for site in sites if site.release_share is not None]
    return rows, findings + spend_findings + check_guarantee(ledger), notes + spend_notes


def collusion_note(site: Site) -> str:
    """For a release summed securely: what is left of the site's guarantee if the server and
    every other site collude (only the least noisy share the site sent then protects it)."""
    share, sites = site.release_share
    history = [(share, 1.0, 1), *((r.noise_multiplier, r.sample_rate, r.steps) for r in site.rounds)]
    if site.unrecorded_steps:  # spent outside the recorded rounds: counted here too, as in the site's epsilon
        history.append((site.noise_multiplier, site.sample_rate, site.unrecorded_steps))
    worst = accountants.epsilon(site.accountant, history, site.delta)
    if site.key_list_signers is None:
        trust = "the site took the server's key list on trust (no peer-keys), so a server that forged it reaches that too"
    else:
        trust = f"the site checked every key's signature against its peer-keys ({', '.join(site.key_list_signers)}): a server cannot forge them"
    if site.release_left_out is not None:
        return (f"sites.{site.site_id}: left out of the secure sum of the embedding releases ({site.release_left_out}); its "
                f"epsilon charges the release all the same; if a share it sent is unmasked: {worst:.4g} ({site.accountant})")
    return (f"sites.{site.site_id}: the embedding release was summed securely over {sites} sites; its "
            f"epsilon assumes the server does not collude with the other sites; if all collude: {worst:.4g} ({site.accountant}); {trust}")


def end_round(ledger: dict[str, Any], run: dict[str, Any], folder: RunFolder) -> int:
    """The last round/epoch the run reached, by any record: ledger rounds and events,
    checkpoints, metrics; a completed centralised run reached its last epoch."""
    seen = [0]
    for site in ledger.get("sites", {}).values():
        if isinstance(site, dict):
            for entry in as_list(site.get("rounds")) + as_list(site.get("events")):  # other shapes: parse_site's findings
                seen.append(number(entry.get("round")) if isinstance(entry, dict) else None)
    seen += [number(c.get("round")) for c in ledger.get("checkpoints", []) if isinstance(c, dict)]
    try:
        metrics = folder.read_metrics()
    except ValueError as exc:
        raise FedPGGANError(f"{folder.metrics_jsonl}: unreadable JSON line ({exc}); restore the file from backup") from exc
    seen += [number(row.get("round", row.get("epoch"))) for row in metrics if isinstance(row, dict)]
    if run["kind"] == "centralised" and run.get("status") == "completed":
        seen.append(number(run["config"].get("epochs")))
    return int(max(v for v in seen if v is not None))
