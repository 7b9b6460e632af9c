"""The run folder: one place that knows where a run keeps what.

    RUN/run.json               resolved config, dataset, partition, versions, status, ledger hash
    RUN/privacy_ledger.json    per-site, per-round DP spend (see fedpggan.privacy.ledger)
    RUN/secure_release_sum.pt the pooled embedding release of --release-aggregation secure (reused on --resume)
    RUN/metrics.jsonl          one JSON line per round (federated) or epoch (centralised)
    RUN/checkpoints/ckpt_NNNNN.pt + index.json (file name, round, sha256; last N kept)
    RUN/samples/*.png          sample grids, one row per class
    RUN/curves/*.png           loss, case-count and epsilon curves
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import re
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from fedpggan.config import RunConfig, flag
from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_bytes, atomic_write_json, check_folder_path, sha256_bytes, sha256_file

if TYPE_CHECKING:
    from fedpggan.privacy.ledger import PrivacyLedger

VERSIONED_PACKAGES = ("fedpggan", "torch", "torchvision", "opacus", "flwr", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_run_dir() -> Path:
    """``runs/<time>``, with ``-2``, ``-3``, ... when a run started in the same second holds that name
    (two runs sharing a folder would mix their partition summaries)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidates = (Path("runs") / (stamp if i == 1 else f"{stamp}-{i}") for i in itertools.count(1))
    return next(path for path in candidates if not path.exists())


class RunFolder:
    """Paths and crash-safe writers for one run folder."""

    def __init__(self, root: str | Path, keep_checkpoints: int = 3) -> None:
        self.root = Path(root)
        self.keep_checkpoints = keep_checkpoints

    run_json = property(lambda self: self.root / "run.json")
    ledger_json = property(lambda self: self.root / "privacy_ledger.json")
    secure_release = property(lambda self: self.root / "secure_release_sum.pt")
    metrics_jsonl = property(lambda self: self.root / "metrics.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    samples = property(lambda self: self.root / "samples")
    curves = property(lambda self: self.root / "curves")

    def create(self) -> None:
        """Make the folder; refuse a file, a folder that holds a run, and one that holds anything
        else (a run whose run.json was lost, an export): training would mix its files with those."""
        if self.run_json.exists():
            raise FedPGGANError(f"{self.root}: already holds a run; choose another --out (or --resume it)")
        check_folder_path(self.root)
        other = sorted(p.name for p in self.root.iterdir() if not self._set_up(p)) if self.root.is_dir() else []
        if other:
            raise FedPGGANError(f"--out {self.root}: folder is not empty (it holds {', '.join(other[:3])}"
                                f"{', ...' if len(other) > 3 else ''}); choose a new or empty folder")
        for sub in (self.root, self.checkpoints, self.samples, self.curves):
            sub.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the run for this process while it trains (an OS lock on ``.lock``, released even on a
        crash). A second trainer of the same folder, e.g. a ``--resume`` while the run still trains,
        is refused: both would take the same steps on the same records, each with its own noise,
        and the ledger they share would charge them once."""
        import fcntl  # POSIX, like the sites and servers; the readers of a run folder (audit, export) need no lock

        with open(self.root / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FedPGGANError(f"{self.root}: another process is training a run in this folder; let it finish (or "
                                    "stop it) before resuming it, or give a new run another --out") from None
            yield

    def _set_up(self, path: Path) -> bool:
        """Whether ``path`` is only what setting up a run makes before run.json: an empty folder of
        :meth:`create` or the simulation's partition summary (the ServerApp creates after it), and the
        lock of a trainer that failed before writing run.json (e.g. no site connected)."""
        if path.name in ("partition.json", ".lock"):
            return path.is_file()
        return path in (self.checkpoints, self.samples, self.curves) and path.is_dir() and not any(path.iterdir())

    def read_json(self, path: Path) -> Any:
        return self.read_json_and_sha256(path)[0]

    def read_json_and_sha256(self, path: Path) -> tuple[Any, str]:
        """The file's JSON and the SHA-256 of the very bytes parsed: one read, so a writer in between
        (a run still training) cannot pair one version's content with another's hash."""
        if not path.is_file():
            raise FedPGGANError(f"{path}: not found; is {self.root} a fedpggan run folder?")
        raw = path.read_bytes()
        try:
            return json.loads(raw.decode()), sha256_bytes(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FedPGGANError(f"{path}: unreadable JSON ({exc.msg if hasattr(exc, 'msg') else exc}); the file is damaged: "
                                "restore it from a backup") from exc

    def read_run(self) -> dict[str, Any]:
        run = self.read_json(self.run_json)
        if not isinstance(run, dict):
            raise FedPGGANError(f"{self.run_json}: not a run record (a JSON object); restore it from a backup")
        return run

    def write_run(self, run: dict[str, Any]) -> None:
        """Write run.json, recording the current ledger's hash so tampering is detectable."""
        if self.ledger_json.exists():
            run["ledger_sha256"] = sha256_file(self.ledger_json)
        run.pop("ledger_sha256_before", None)
        atomic_write_json(self.run_json, run)

    def save_ledger(self, ledger: "PrivacyLedger", run: dict[str, Any]) -> None:
        """Write the ledger and run.json (with the ledger's hash) in step. run.json first names the
        new hash and the one it replaces (``ledger_sha256_before``), then the ledger is written, then
        run.json drops the old hash: a kill between any two writes leaves a ledger that run.json
        vouches for, the new one or, if the ledger write never happened, the one before it. What
        the unwritten change recorded was not yet released: a checkpoint is written only once the
        ledger on disk holds the spend of the rounds it covers."""
        content = ledger.content()
        before = None  # never vouch for a ledger nobody verified
        if self.ledger_json.exists() and self.run_json.exists():
            actual = sha256_file(self.ledger_json)
            before = actual if self.ledger_vouched_for(self.read_run(), actual) else None
        atomic_write_json(self.run_json, {**run, "ledger_sha256": sha256_bytes(content), "ledger_sha256_before": before})
        atomic_write_bytes(self.ledger_json, content)
        self.write_run(run)

    def ledger_vouched_for(self, run: dict[str, Any], actual: str | None = None) -> bool:
        """Whether the ledger on disk is the one run.json records (or, after a kill inside
        :meth:`save_ledger`, the one it was replacing); ``actual``: its SHA-256, if already known."""
        actual = actual or sha256_file(self.ledger_json)
        return actual == run.get("ledger_sha256") or (run.get("ledger_sha256_before") is not None
                                                      and actual == run["ledger_sha256_before"])

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows so far. A last line cut short (a kill or a full disk mid-append) is left out:
        that row's round or epoch is redone by a resume; any other unreadable line is an error."""
        if not self.metrics_jsonl.exists():
            return []
        lines = [line for line in self.metrics_jsonl.read_text(errors="replace").splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1:
                    print(f"warning: {self.metrics_jsonl}: its last line is cut short (a kill mid-write); left out",
                          file=sys.stderr)
                    break
                raise FedPGGANError(f"{self.metrics_jsonl}: line {i + 1} is not JSON ({exc.msg}); restore the file "
                                    "from a backup, or delete that line") from None
            if not isinstance(rows[-1], dict):
                raise FedPGGANError(f"{self.metrics_jsonl}: line {i + 1} is not a JSON object; restore the file from a backup")
        return rows

    def keep_metrics_through(self, last: int, key: str) -> None:
        """Drop the rows after round or epoch ``last`` (``key``: "round" or "epoch"), which a resume redoes;
        written whole and atomically, so a kill keeps the old rows."""
        rows = [r for r in self.read_metrics() if r[key] <= last]
        atomic_write_bytes(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode())

    # --- checkpoints -----------------------------------------------------------------
    def checkpoint_index(self) -> list[dict[str, Any]]:
        """checkpoints/index.json's entries (round, file, sha256); a malformed index is a one-line error."""
        index = self.checkpoints / "index.json"
        entries = self.read_json(index) if index.exists() else []
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("round"), int) and isinstance(e.get("file"), str)
                and isinstance(e.get("sha256"), str) for e in entries):
            raise FedPGGANError(f"{index}: not a list of {{round, file, sha256}} entries; restore it from backup (the "
                                "ledger lists the same checkpoints with their hashes)")
        return entries

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"ckpt_{step:05d}.pt"

    @staticmethod
    def checkpoint_round(name: str) -> int | None:
        """ckpt_00012.pt -> 12 (the names checkpoint_path gives); None for any other name."""
        match = re.fullmatch(r"ckpt_(\d+)\.pt", name)
        return int(match.group(1)) if match else None

    def record_checkpoint(self, step: int, sha256: str) -> None:
        """Add a written checkpoint to the index and delete the oldest beyond ``keep``."""
        entries = [e for e in self.checkpoint_index() if e["round"] != step]
        entries.append({"round": step, "file": self.checkpoint_path(step).name, "sha256": sha256})
        entries.sort(key=lambda e: e["round"])
        for old in entries[: -self.keep_checkpoints]:
            (self.checkpoints / old["file"]).unlink(missing_ok=True)
        atomic_write_json(self.checkpoints / "index.json", entries[-self.keep_checkpoints :])

    def discard_checkpoints_after(self, round_num: int) -> None:
        """Index the usable checkpoints up to ``round_num`` (the one a resume continues from and
        those before it); every other checkpoint file (newer ones the resume could not use, one
        written just before a kill, one the ledger does not list) becomes NAME.discarded: kept for
        inspection, never used."""
        kept = [e for e in self.usable_checkpoints() if e["round"] <= round_num]
        atomic_write_json(self.checkpoints / "index.json", kept)
        names = {e["file"] for e in kept}
        for path in self.checkpoints.glob("*.pt"):
            if path.name not in names:
                path.replace(path.with_name(path.name + ".discarded"))

    def read_verified_ledger(self, run: dict[str, Any], use: str) -> dict[str, Any]:
        """The ledger, only if it is the one run.json recorded (not edited, swapped or lost since):
        ``use`` (e.g. "export", "resume") names what needs it, in the one-line refusal."""
        if not self.ledger_json.is_file():
            raise FedPGGANError(f"{self.ledger_json}: missing, so the run's privacy cannot be verified; {use} needs the "
                                "run's original privacy ledger (restore it from a backup)")
        if not self.ledger_vouched_for(run):
            raise FedPGGANError(f"{self.ledger_json}: content hash differs from ledger_sha256 in {self.run_json} "
                                f"(edited or tampered); {use} needs the run's original ledger: restore it")
        return self.read_ledger()

    def check_report_folder(self, out: Path, option: str = "--out") -> bool:
        """A report of this run goes to its folder or to one of its own: never into another run's folder
        (whose report it would replace, and whose export would publish it) nor into an export, which is
        published as it is, while evaluation and audit reports stay inside the consortium. Returns
        whether ``out`` is this run's folder."""
        if out.resolve() == self.root.resolve():
            return True
        if (out / "run.json").exists():
            raise FedPGGANError(f"{option} {out}: is another run's folder (it holds run.json), whose own report this would "
                                f"replace; write to {self.root} or to a folder of its own")
        export = next((folder for folder in (out, *out.resolve().parents) if (folder / "datasheet.json").exists()), None)
        if export is not None:
            raise FedPGGANError(f"{option} {out}: is {'an export' if export == out else 'inside the export ' + str(export)} "
                                "(it holds datasheet.json), which is published as it is, and reports stay inside the "
                                "consortium; choose a folder outside it")
        return False

    def verified(self, entry: dict[str, Any]) -> bool:
        """Whether an index entry's file is on disk with the content hash recorded for it."""
        path = self.checkpoints / entry["file"]
        return path.is_file() and sha256_file(path) == entry["sha256"]

    def vouched_ledger(self) -> dict[str, Any] | None:
        """The ledger, if run.json vouches for it; None otherwise (an edited ledger vouches for nothing)."""
        if not (self.ledger_json.is_file() and self.run_json.is_file()) or not self.ledger_vouched_for(self.read_run()):
            return None
        return self.read_ledger()

    def usable_checkpoints(self) -> list[dict[str, Any]]:
        """The checkpoints a run may be read at or continue from, oldest first: the index's entries
        that the ledger lists (a file slipped into the index is not one), and any the ledger lists
        after the newest of those (a kill between the ledger's entry and the index's leaves one, and so
        does an index entry edited to another hash; the ledger holds the hash the file must have).
        Without a ledger run.json vouches for, the index alone."""
        index, ledger = self.checkpoint_index(), self.vouched_ledger()
        if ledger is None:
            return index
        listed = ledger_checkpoints(ledger)
        hashes = {c.get("sha256") for c in listed}
        entries = [e for e in index if e["sha256"] in hashes]
        newest = max((e["round"] for e in entries), default=0)
        entries += [{"round": c["round"], "file": c["file"], "sha256": c["sha256"]} for c in listed if c["round"] > newest]
        return sorted(entries, key=lambda e: e["round"])

    def ledger_lists_checkpoints(self) -> bool:
        """Whether the ledger file lists any checkpoint (so an empty index means a lost one)."""
        return self.ledger_json.is_file() and bool(self.read_ledger().get("checkpoints"))

    def read_ledger(self) -> dict[str, Any]:
        ledger = self.read_json(self.ledger_json)
        if not isinstance(ledger, dict):
            raise FedPGGANError(f"{self.ledger_json}: not a privacy ledger (a JSON object); restore it from a backup")
        return ledger

    def latest_checkpoint(self, warn: bool = True) -> tuple[Path, dict[str, Any]]:
        """Newest checkpoint whose content hash verifies; a missing or corrupt one is skipped, with
        a printed warning when ``warn`` (a resumed run then redoes the rounds after the one it uses)."""
        entries = self.usable_checkpoints()
        if not entries and self.checkpoint_index():
            raise FedPGGANError(f"{self.checkpoints / 'index.json'}: {self.ledger_json.name} lists none of its checkpoints, "
                                "so none has a stated privacy guarantee; restore the run's original ledger")
        if not entries and self.ledger_lists_checkpoints():
            raise FedPGGANError(f"{self.checkpoints / 'index.json'}: missing, and the ledger does not match run.json's "
                                "record of it, so no checkpoint's hash can be verified; restore both from a backup")
        if not entries:
            raise FedPGGANError(f"{self.root}: no checkpoints found; train a run first or pass a run folder")
        skipped = []
        for entry in reversed(entries):
            if self.verified(entry):
                for file, round_ in skipped if warn else []:  # only when one is usable: otherwise the error says it all
                    print(f"warning: {file} (round {round_}): missing or hash mismatch (deleted, corrupt or truncated); "
                          "using an earlier checkpoint", file=sys.stderr)
                return self.checkpoints / entry["file"], entry
            skipped.append((self.checkpoints / entry["file"], entry["round"]))
        raise FedPGGANError(f"{self.root}: all {len(entries)} checkpoints are missing or fail their hash check (deleted, "
                            f"corrupt or truncated); restore {self.checkpoints} from a backup, or train the run again")

    def checkpoint_file(self, spec: str) -> Path:
        """``--checkpoint FILE|ROUND`` of export and evaluate: a round number (its file in
        checkpoints/), a .pt path, or a file name in checkpoints/."""
        spec = str(spec)
        candidates = [self.checkpoint_path(int(spec))] if spec.isascii() and spec.isdigit() else [Path(spec).expanduser(), self.checkpoints / spec]
        for path in candidates:
            if path.is_file():
                return path
        rounds = ", ".join(str(e["round"]) for e in self.checkpoint_index() if (self.checkpoints / e["file"]).is_file())
        raise FedPGGANError(f"--checkpoint {spec}: no such checkpoint file or round; give a .pt file or a round "
                            f"with a checkpoint in {self.checkpoints} ({rounds or 'none'})")


def ledger_checkpoints(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoints a ledger vouches for: those it lists and no resume set aside (``discarded``)."""
    return [c for c in ledger.get("checkpoints") or [] if isinstance(c, dict) and not c.get("discarded")]


def recorded_generator_steps(run: dict[str, Any]) -> int | None:
    """The generator steps per round a federated run took: what its server chose (run.json's
    ``generator_steps``, for --g-steps 0), else the option it gave; None when neither says."""
    chosen = run.get("generator_steps")
    if isinstance(chosen, dict) and isinstance(chosen.get("per_round"), int):
        return chosen["per_round"]
    given = (run.get("config") or {}).get("g-steps")
    return given if isinstance(given, int) and given > 0 else None


# How each kind of run is continued, for the one line that refuses the other command.
RESUME_COMMANDS = {"centralised": "fedpggan train --resume {run}",
                   "federated": "fedpggan simulate --resume {run} (deployed: --run-config \"resume-from='{run}'\")"}


# What a resume may change: where the data lie and what runs the steps, never what the steps are. The
# data's content is checked against the run's own record of it (run.json's or partition.json's hashes).
RESUME_MAY_CHANGE = ("dataset", "data_dir", "device")


def config_to_resume(path: str | Path, kind: str = "federated", changes: dict[str, Any] | None = None) -> RunConfig:
    """The options of the run in ``path``, to continue it from its newest checkpoint (``train``
    and simulation ``--resume``, a deployed coordinator's ``resume-from``), with ``changes`` of
    :data:`RESUME_MAY_CHANGE`; a completed run, one without a checkpoint or one of the other
    ``kind`` is refused with one line."""
    folder = RunFolder(path)
    info = folder.read_run()
    found = info.get("kind") if isinstance(info, dict) else None
    if found != kind:
        how = RESUME_COMMANDS.get(found)
        raise FedPGGANError(f"{folder.root}: is a {found or 'unknown'} run, not a {kind} one; "
                            + (f"continue it with `{how.format(run=folder.root)}`" if how else "pass a run folder the trainer wrote"))
    refuse_completed(folder.root, info)
    if not folder.checkpoint_index() and not folder.ledger_lists_checkpoints():
        raise FedPGGANError(f"{folder.root}: no checkpoints found: the run stopped before its first one, so there is "
                            "nothing to resume; start a new run (what this one spent stays in its ledger)")
    folder.latest_checkpoint(warn=False)  # fail early, with one line, if nothing can be resumed (the resume warns)
    if not isinstance(info.get("config"), dict):
        raise FedPGGANError(f"{folder.run_json}: has no 'config' (the run's options), so the run cannot continue with "
                            "them; restore run.json from a backup")
    changes = changes or {}
    if {"dataset", "data_dir"} & changes.keys() and not records_data_hash(folder, info):
        raise FedPGGANError(f"{folder.root}: the run recorded no content hash of its data, so --resume cannot check that "
                            "other paths hold the same records; resume without --dataset/--data-dir, from where the run started")
    return dataclasses.replace(RunConfig.from_saved(current_options(info)), out=str(folder.root), **changes)


def current_options(info: dict[str, Any]) -> dict[str, Any]:
    """The run's options as it trains now (flag names): run.json's config stays as the run began (its ledger
    holds its hash), and a resume's new paths (e.g. a moved --data-dir) are kept beside it in ``resumed_with``."""
    config = info.get("config") if isinstance(info.get("config"), dict) else {}  # a damaged run.json: what callers check
    moved = info.get("resumed_with") if isinstance(info.get("resumed_with"), dict) else {}
    return {**config, **moved}


def resumed_with(cfg: RunConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The options of :data:`RESUME_MAY_CHANGE` a resumed run trains with where they differ from
    run.json's config (flag names): what run.json's ``resumed_with`` keeps for the next resume,
    and what the checkpoints written since may differ from run.json in."""
    now, saved = cfg.to_flower(), info.get("config") or {}
    return {flag(name): now[flag(name)] for name in RESUME_MAY_CHANGE if now.get(flag(name)) != saved.get(flag(name))}


def records_data_hash(folder: RunFolder, info: dict[str, Any]) -> bool:
    """Whether the run recorded what its data hash to: run.json's ``dataset.sha256`` (centralised,
    since 2026-12-06) or a hash per site in partition.json (simulations)."""
    if isinstance(info.get("dataset"), dict) and info["dataset"].get("sha256"):
        return True
    partition = folder.root / "partition.json"
    rows = folder.read_json(partition) if partition.is_file() else None
    return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and r.get("sha256") for r in rows)


def resume_changes(args: Any) -> dict[str, Any]:
    """The options of :data:`RESUME_MAY_CHANGE` given with ``--resume``."""
    return {name: getattr(args, name) for name in RESUME_MAY_CHANGE if getattr(args, name, None) is not None}


def refuse_completed(root: Path, info: dict[str, Any]) -> None:
    """A completed run has nothing to resume: checked when ``--resume`` starts and again once the
    run is held (its trainer may have finished in between)."""
    if info.get("status") == "completed":
        raise FedPGGANError(f"{root}: the run already completed; nothing to resume (start a new run)")


def refuse_options_with_resume(args: Any, names: list[str]) -> None:
    """``--resume`` continues a run with its own options: any other option given is refused, except
    where the data lie and the device (:data:`RESUME_MAY_CHANGE`)."""
    given = [name for name in [*names, "config"] if getattr(args, name, None) is not None and name not in RESUME_MAY_CHANGE]
    if given:
        raise FedPGGANError(f"--resume continues {args.resume} with its own configuration; drop --{flag(given[0])} "
                            "(start a new run to change options; a resume takes only --dataset, --data-dir and --device)")
