"""Fault injection for the reliability tests and the soak benchmark (never used in a real run).

* ``app``: a ClientApp that is the real site, except that partition 0 sends a broken or
  hostile reply and the other sites crash now and then. Ray's workers inherit the driver's
  environment, so the faults are set there: ``FEDPGGAN_FAULT_MODES`` (comma-separated, one
  per round, cycled: nan | scaled | random | shapes | scaled-g | overspend | none) and
  ``FEDPGGAN_FAULT_DROP`` (probability that another site crashes in a round; the draw is
  seeded by round and site, so a resumed run meets the same crashes), and
  ``FEDPGGAN_FAULT_RELEASE`` (comma-separated ``step:partition``, step ``keys``, ``masked`` or ``reveal``:
  that site fails that step of the secure release; at ``masked`` it first makes its share, as a
  site whose reply is lost would).
* ``start_killable`` / ``kill_hard``: a simulation in its own process group, and a SIGKILL
  of that group plus any Ray process of its session: a power cut, not a clean shutdown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client import client_app as site
from fedpggan.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return site.query(msg, context)


@app.query("release_keys")
def release_keys(msg: Message, context: Context) -> Message:
    fail_in_release("keys", context)
    return site.release_keys(msg, context)


@app.query("release_masked")
def release_masked(msg: Message, context: Context) -> Message:
    reply = site.release_masked(msg, context)
    fail_in_release("masked", context)
    return reply


@app.query("release_reveal")
def release_reveal(msg: Message, context: Context) -> Message:
    fail_in_release("reveal", context)
    return site.release_reveal(msg, context)


def fail_in_release(step: str, context: Context) -> None:
    partition = context.node_config.get("partition-id", -1)
    if f"{step}:{partition}" in os.environ.get("FEDPGGAN_FAULT_RELEASE", "").split(","):
        raise RuntimeError(f"injected failure of site {partition} in the secure release's {step} step")


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition, round_num = int(context.node_config.get("partition-id", -1)), int(msg.content["config"]["round"])
    drop = float(os.environ.get("FEDPGGAN_FAULT_DROP", "0"))
    if partition != 0 and random.Random(f"{round_num}/{partition}").random() < drop:
        raise RuntimeError(f"injected crash of site {partition} in round {round_num}")
    reply = site.train(msg, context)
    modes = os.environ.get("FEDPGGAN_FAULT_MODES", "none").split(",")
    if partition == 0:
        tamper(reply, msg, modes[(round_num - 1) % len(modes)])
    return reply


def tamper(reply: Message, msg: Message, mode: str) -> None:
    """Replace the reply's D (or its reported spend) the way a broken or hostile site would."""
    d = reply.content["d"].to_torch_state_dict()
    first = next(iter(d))
    if mode == "nan":
        d[first] = torch.full_like(d[first], float("nan"))
    elif mode == "scaled":  # model replacement: the honest update times 100
        global_d = msg.content["d"].to_torch_state_dict()
        d = {k: g + 100 * (d[k] - g) if g.is_floating_point() else d[k] for k, g in global_d.items()}
    elif mode == "random":
        d = {k: torch.randn_like(v) * 10 if v.is_floating_point() else v for k, v in d.items()}
    elif mode == "shapes":
        d.pop(first)
    elif mode == "scaled-g":  # honest D, locally trained generators replaced (--generator-training local)
        g = reply.content["g"].to_torch_state_dict()
        reply.content["g"] = ArrayRecord({k: v * 1e3 if v.is_floating_point() else v for k, v in g.items()})
    elif mode == "overspend":  # honest weights, a spend its config does not allow
        privacy = dict(reply.content["privacy"])
        privacy["noise_multiplier"] = privacy["noise_multiplier"] / 2
        reply.content["privacy"] = MetricRecord(privacy)
    elif mode != "none":
        raise ValueError(f"FEDPGGAN_FAULT_MODES: unknown mode {mode!r}")
    reply.content["d"] = ArrayRecord(d)


def start_killable(cfg: RunConfig, ray_tmp: str, faulty: bool = False) -> subprocess.Popen:
    """``simulate(cfg)`` in a new process group (with this module's faulty sites if ``faulty``);
    ``ray_tmp`` (short: Ray's socket paths are length-limited) marks its Ray processes so that
    ``kill_hard`` finds them all."""
    code = ("import json, sys; from fedpggan.config import RunConfig; from simulation.run import simulate; "
            "from simulation.faults import app; "
            f"simulate(RunConfig(**json.loads(sys.argv[1])).validate(), client_app=app if {faulty} else None)")
    # this process's intra-op thread count: float sums, and so the weights, depend on it, and a killed
    # run is compared bit for bit with one run here (an inherited OMP_NUM_THREADS could differ)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg))], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_hard(proc: subprocess.Popen, ray_tmp: str, timeout: float = 60.0) -> None:
    """SIGKILL the process group, then every process of that Ray session that left the group
    (found by ``RAY_TMPDIR`` in its environment: Ray workers rename their command line), and
    wait until they are gone, so that nothing of the killed run can write afterwards."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while (left := session_processes(ray_tmp)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def session_processes(ray_tmp: str) -> list[int]:
    """Live (not zombie) processes whose environment or command line names ``ray_tmp``."""
    marker, pids = ray_tmp.encode(), []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if b"\nState:\tZ" in (proc_dir / "status").read_bytes():
                continue
            if any(marker in (proc_dir / f).read_bytes() for f in ("environ", "cmdline")):
                pids.append(int(proc_dir.name))
        except (OSError, ValueError):
            continue
    return pids


def round_in_flight(run: Path, round_num: int) -> bool:
    """True once any site has reserved (started) ``round_num``."""
    for state in run.glob("sites/*/*/site_state.json"):
        try:
            if str(round_num) in json.loads(state.read_text())["rounds"]:
                return True
        except (json.JSONDecodeError, KeyError, OSError):
            continue  # being written
    return False
