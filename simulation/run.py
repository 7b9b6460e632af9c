"""Run N simulated hospital sites on one machine with Flower's simulation engine.

    python simulation/run.py --clients 5            (same as: fedpggan simulate --clients 5)
    python simulation/run.py --resume runs/<id>     (continue a killed run)

Before Flower starts (and before the run folder is made), the runner checks the options, the
image size, the data and every site's noise calibration, and prints the per-site partition
table (it is the operator of a simulation and holds all the data; in a real deployment no
one does). The ServerApp and ClientApps are the same as in deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedpggan import config
from fedpggan.build import (open_training_data, prior_tensor, refuse_classes_without_images, warn_if_resized,
                            warn_single_class, warn_without_dp, with_resolved_dataset)
from fedpggan.cli import INTERRUPTED
from fedpggan.config import RunConfig
from fedpggan.data import partition, partition_summary, partition_table
from fedpggan.data.partition import check_same_partition, site_sha256
from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_json
from fedpggan.preflight import check_federated_budget, check_image_size, check_simulation_resources
from fedpggan.runs import RunFolder, config_to_resume, current_options, default_run_dir, refuse_options_with_resume, resume_changes

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

OPTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("epochs", "d_steps")]
T = TypeVar("T")
STOPPED_EXIT_CODE = 3  # a run that stopped cleanly (too few sites): neither success (0) nor a user error (2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, OPTIONS)
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")


def prepare(cfg: RunConfig) -> tuple[RunConfig, list[dict]]:
    """Resolve the dataset, check that it splits into the sites and that the model and every
    site's budget can be set up; print the partition table."""
    cfg.validate()  # also when called from Python with a RunConfig built by hand
    check_image_size(cfg.image_size)
    check_simulation_resources(cfg)
    data = open_training_data(cfg)
    refuse_classes_without_images(data)
    prior_tensor(cfg, data.num_classes)  # the ServerApp's check, made before Flower starts
    cfg = with_resolved_dataset(cfg, data)
    parts = partition(data.labels.numpy(), cfg.clients, cfg.partition, cfg.alpha, cfg.min_per_site, cfg.seed)
    check_federated_budget(cfg, map(len, parts))
    warn_without_dp(cfg)
    warn_single_class(data)
    warn_if_resized(data, cfg.image_size)
    print(f"dataset: {data.name}{'' if data.is_medical else ' (NOT medical data)'} -- {len(data)} training images, "
          f"{data.num_classes} classes, {data.channels}x{data.image_size}x{data.image_size}")
    print(partition_table(data.labels.numpy(), parts, data.class_names))
    summary = partition_summary(data.labels.numpy(), parts, data.class_names)
    return cfg, [{**row, "sha256": sha} for row, sha in zip(summary, site_sha256(data, parts))]


def check_resumable(cfg: RunConfig, folder: RunFolder) -> None:
    """What ``prepare`` checks for a new run, for a resumed one: the machine can host the sites, and
    their data still split into the records each site began with (a site rebuilds its share)."""
    check_simulation_resources(cfg)
    if not (folder.root / "partition.json").is_file():
        return
    data = open_training_data(cfg)
    parts = partition(data.labels.numpy(), cfg.clients, cfg.partition, cfg.alpha, cfg.min_per_site, cfg.seed)
    trained = current_options(folder.read_run())  # where the run last trained, before this resume's --dataset/--data-dir
    where = str(trained.get("dataset")) + (f" in {trained['data-dir']}" if trained.get("data-dir") else "")
    check_same_partition(folder.read_json(folder.root / "partition.json"), data, parts,
                         f"the run trained on {where}: resume with those data, as they were, or start a new run")


def simulate(cfg: RunConfig | None, resume: str | None = None, client_app: ClientApp | None = None,
             changes: dict[str, Any] | None = None) -> Path:
    """Run (or resume) a simulation; return the run folder. Raises FedPGGANError on failure.
    ``client_app`` replaces the product's site (the soak benchmark's fault injection uses it);
    ``changes`` are what a resume may change (fedpggan.runs.RESUME_MAY_CHANGE)."""
    from flwr.simulation import run_simulation

    from client.client_app import app as site_app
    from server.server_app import make_server_app

    client_app = client_app or site_app
    if resume:
        cfg = config_to_resume(resume, changes=changes)
        folder = RunFolder(cfg.out)
        check_resumable(cfg, folder)
    else:
        cfg, summary = prepare(cfg)
        cfg = dataclasses.replace(cfg, out=cfg.out or str(default_run_dir()))
        folder = RunFolder(cfg.out)
        folder.create()
        atomic_write_json(folder.root / "partition.json", summary)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # One operator holds every simulated site's data: sites may derive their noise keys from
    # --seed (client/site_round.py), which makes a simulation reproducible and resumable bit for bit.
    backend = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        # Ray binds to loopback only (a simulation never listens on a network interface) unless
        # RAY_ADDRESS names a Ray cluster to join, the way to scale past one machine.
        "init_args": {"include_dashboard": False, "log_to_driver": True,
                      **({} if os.environ.get("RAY_ADDRESS") else {"_node_ip_address": "127.0.0.1"})},
    }
    with simulation_marked():
        run_simulation(server_app=make_server_app(dataclasses.replace(cfg, out=str(folder.root)), resume=bool(resume)),
                       client_app=client_app, num_supernodes=cfg.clients, backend_config=backend)
    status = json.loads(folder.run_json.read_text()).get("status") if folder.run_json.exists() else None
    if status not in ("completed", "stopped"):
        raise FedPGGANError(f"{folder.root}: the simulation ended with status {status!r}; see the log above, then "
                            f"--resume {folder.root}")
    return folder.root


def interruptible(func: Callable[[], T]) -> T:
    """``func()`` on a daemon thread, which a Ctrl-C or SIGTERM can end. Flower's runtime would block
    the main thread in a join that ignores Ctrl-C, and its ServerApp thread would hold the exit until
    the round timed out; so on either signal the process exits at once (Ray's processes end with
    their driver). Nothing is left half-written: the run replaces its files atomically (a resume continues)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        return func()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = func()
        except BaseException as exc:  # re-raised on the main thread: one-line errors as before
            outcome["error"] = exc

    def terminate(signum: int, frame: Any) -> None:  # Ray sets its own SIGTERM handler only on the main thread
        outcome["signal"] = signum
        raise KeyboardInterrupt

    thread = threading.Thread(target=target, name="simulation", daemon=True)
    previous = signal.signal(signal.SIGTERM, terminate)
    ray_says_so = logging.getLogger("ray._private.worker")  # ... and says so, for the handler set here
    quiet = NotOnMainThread()
    ray_says_so.addFilter(quiet)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # a short wait: the main thread stays free to take the signal
    except KeyboardInterrupt:
        for name in (signal.SIGINT, signal.SIGTERM):  # a second signal must not break off the exit below
            signal.signal(name, signal.SIG_IGN)
        print(INTERRUPTED, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + outcome.get("signal", signal.SIGINT))  # 130 for a Ctrl-C, 143 for SIGTERM
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        ray_says_so.removeFilter(quiet)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class NotOnMainThread(logging.Filter):
    """Drops Ray's warning that it set no SIGTERM handler off the main thread (:func:`interruptible` sets one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextlib.contextmanager
def simulation_marked() -> Iterator[None]:
    """Set FEDPGGAN_SIMULATION=1 for the simulation's sites only, restoring it afterwards.

    A site in a later run of the same process (a test, a notebook) must not inherit the mark:
    it lets a site derive its noise key from --seed, which only one operator holding every
    simulated site's data may do.
    """
    before = os.environ.get("FEDPGGAN_SIMULATION")
    os.environ["FEDPGGAN_SIMULATION"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FEDPGGAN_SIMULATION", None)
        else:
            os.environ["FEDPGGAN_SIMULATION"] = before


def main(argv: list[str] | None = None) -> int:
    from fedpggan.cli import OneLineParser, run_reporting_errors

    parser = OneLineParser(prog="simulation/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: run_from_args(args), args.debug)


def run_from_args(args: argparse.Namespace) -> int:
    if args.resume:
        refuse_options_with_resume(args, OPTIONS)
    cfg = None if args.resume else config.resolve(args, OPTIONS)
    root = interruptible(lambda: simulate(cfg, args.resume, changes=resume_changes(args) if args.resume else None))
    if json.loads((root / "run.json").read_text()).get("status") == "stopped":  # resumable, but not what was asked
        print(f"error: {root}: the run stopped before its planned end (the reason is above and in run.json); "
              f"continue it with --resume {root}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
