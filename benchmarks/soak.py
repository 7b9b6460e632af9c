"""Soak: 20 simulated sites x 30 DP rounds with random site crashes, one hostile site and one
kill -9 + resume, on CPU with tiny models and phantom data.

    python benchmarks/soak.py                       # ~15 min on 2 cores
    python benchmarks/soak.py --sites 5 --rounds 6  # a quick look

Reports rounds completed, updates rejected, site failures, the budget overshoot (claimed and
recomputed by the independent audit; must be 0) and whether the final checkpoint verifies.
Writes benchmarks/results/soak-<device>-<date>.json and .md (soak-<device>-<sites>x<rounds>-<date> for another size).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from fedpggan.audit.runner import audit_run
from fedpggan.config import RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_bytes, atomic_write_json, new_results_paths
from fedpggan.runs import RunFolder, library_versions
from simulation import faults
from simulation.run import simulate

HOSTILE_MODES = "scaled,random,nan,shapes,none"  # what the hostile site sends, round by round
STALL_SECONDS = 600  # per round: a run slower than this before the kill counts as stalled


def soak_config(sites: int, rounds: int, out: Path) -> RunConfig:
    return RunConfig(dataset="phantom", clients=sites, rounds=rounds, local_steps=2, g_steps=1, batch_size=16,
                     g_batch_size=32, g_width=16, d_width=8, latent_dim=16, epsilon=10.0, min_per_site=10,
                     sample_every=rounds, aggregation="median", embedding_frequencies=100, device="cpu",  # as the results say
                     out=str(out)).validate()


def run_with_a_kill(cfg: RunConfig, kill_round: int) -> int:
    """Start the run, SIGKILL it while ``kill_round`` is in flight, resume it; return how many
    rounds were complete when it was killed."""
    run = Path(cfg.out)
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are length-limited
    proc = faults.start_killable(cfg, ray_tmp, faulty=True)
    deadline = time.monotonic() + STALL_SECONDS * kill_round
    try:
        while not faults.round_in_flight(run, kill_round):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the run ended or stalled before round {kill_round} (exit code "
                                 f"{proc.poll()}); see {run}/metrics.jsonl, or lower --kill-round")
            time.sleep(0.05)
    finally:
        faults.kill_hard(proc, ray_tmp)
    done = len(RunFolder(run).read_metrics())
    print(f"killed with round {kill_round} in flight ({done} rounds complete); resuming", flush=True)
    simulate(None, resume=str(run), client_app=faults.app)
    return done


def summarise(cfg: RunConfig, killed_after: int, seconds: float) -> dict:
    folder = RunFolder(cfg.out)
    rows = folder.read_metrics()
    ledger = folder.read_json(folder.ledger_json)
    events = [e for site in ledger["sites"].values() for e in site["events"]]
    audit = audit_run(folder.root)
    claimed = max(s["epsilon"] for s in ledger["sites"].values())
    recomputed = max(row["tightest_epsilon"] for row in audit["sites"].values())
    _, entry = folder.latest_checkpoint()  # the newest that verifies (an older one when it does not)
    return {
        "sites": cfg.clients, "rounds": cfg.rounds, "status": folder.read_run()["status"],
        "rounds_completed": sum(1 for r in rows if "skipped" not in r), "rounds_skipped": sum(1 for r in rows if "skipped" in r),
        "killed_after_round": killed_after,
        "updates_rejected": sum(e["event"] == "rejected_update" for e in events),
        "site_failures": sum(e["event"] == "failed" for e in events),
        "in_flight_round_events": sorted({e["event"] for e in events if e["event"] in ("replayed", "recovered",
                                                                                        "unrecorded_spend")}),
        "budget": cfg.epsilon, "max_claimed_epsilon": claimed, "max_recomputed_epsilon": recomputed,
        "budget_overshoot": max(0.0, claimed - cfg.epsilon, recomputed - cfg.epsilon),
        "audit_passed": audit["passed"], "audit_violations": [v["reason"] for v in audit["violations"]],
        "final_checkpoint_round": entry["round"], "final_checkpoint_verifies": entry["round"] == cfg.rounds,
        "seconds": round(seconds, 1), "run_folder": str(folder.root),
    }


def markdown(result: dict, meta: dict) -> str:
    lines = [f"# Soak: {result['sites']} sites x {result['rounds']} rounds on {meta['device']} ({meta['date']})", "",
             f"Faults: site crashes with probability {meta['drop']} per site and round; site 0 sends "
             f"{meta['hostile_modes']} (cycled); SIGKILL of the whole simulation with round {meta['kill_round']} in "
             "flight, then --resume. Tiny models, phantom data, DP at epsilon 10, median aggregation.", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in result.items() if k != "run_folder"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--kill-round", type=int, help="kill the run while this round is in flight (default: half way)")
    p.add_argument("--drop", type=float, default=0.1, help="per-site, per-round crash probability (default 0.1)")
    p.add_argument("--work", default="runs/soak", help="where the run folder goes (must not exist)")
    p.add_argument("--results", default="benchmarks/results")
    args = p.parse_args(argv)
    kill_round = args.kill_round or max(2, args.rounds // 2)
    if not 2 <= kill_round <= args.rounds:
        p.error(f"--kill-round {kill_round} must be between 2 and --rounds {args.rounds}")
    out = Path(args.work) / f"soak-{args.sites}x{args.rounds}"
    if out.exists():
        p.error(f"{out} exists; remove it or pass another --work")
    today = date.today().isoformat()
    size = "" if (args.sites, args.rounds) == (20, 30) else f"{args.sites}x{args.rounds}-"  # a quick look never blocks the soak
    stem = Path(args.results) / f"soak-cpu-{size}{today}"
    try:
        json_path, md_path = new_results_paths(stem)
    except FedPGGANError as e:
        p.error(str(e))
    os.environ.update(FEDPGGAN_FAULT_MODES=HOSTILE_MODES, FEDPGGAN_FAULT_DROP=str(args.drop))  # inherited by Ray
    cfg = soak_config(args.sites, args.rounds, out)
    t0 = time.perf_counter()
    killed_after = run_with_a_kill(cfg, kill_round)
    result = summarise(cfg, killed_after, time.perf_counter() - t0)
    meta = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "date": today, "drop": args.drop, "hostile_modes": HOSTILE_MODES,
            "kill_round": kill_round, "versions": library_versions()}
    atomic_write_json(json_path, {"meta": meta, "result": result})
    atomic_write_bytes(md_path, markdown(result, meta).encode())
    print(markdown(result, meta))
    ok = result["budget_overshoot"] == 0 and result["final_checkpoint_verifies"] and result["audit_passed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
