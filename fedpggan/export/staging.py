"""All-or-nothing output: build the export in a hidden sibling folder, move it in at the end.

An interrupted or failed export leaves no half-written dataset behind, and ``--overwrite``
keeps the previous export intact until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpggan.errors import FedPGGANError
from fedpggan.io import check_folder_path


def check_target(out: Path, run_root: Path, overwrite: bool, export_entries: set[str]) -> None:
    """Refuse a file, the run folder, a folder inside it or above it, and a non-empty folder
    unless ``overwrite`` and it is an earlier export (a fedpggan datasheet.json, and nothing but
    ``export_entries``, the names an export writes): an export may replace an export, never a run,
    its checkpoints or anyone's other files."""
    target, run = out.resolve(), run_root.resolve()
    if target == run or target in run.parents or run in target.parents:
        raise FedPGGANError(f"--out {out}: would replace the run folder {run_root} or a folder of it; choose a folder "
                            "outside it")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise FedPGGANError(f"--out {out}: is the folder you are in (or above it), and an export replaces its folder "
                            "as a whole; give a new folder, e.g. --out ./export")
    check_folder_path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FedPGGANError(f"--out {out}: folder is not empty; choose a new folder or pass --overwrite to replace an "
                            "earlier export")
    if not is_datasheet(out / "datasheet.json") or any(out.rglob("run.json")) or any(out.rglob("privacy_ledger.json")):
        raise FedPGGANError(f"--out {out}: not an earlier export (no fedpggan datasheet.json, or it holds a training run), "
                            "which --overwrite never replaces; choose a new or empty folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in export_entries)
    if others:
        raise FedPGGANError(f"--out {out}: holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which no export "
                            "writes, and --overwrite replaces the folder as a whole; move them out or choose a new folder")


def is_datasheet(path: Path) -> bool:
    """Whether ``path`` is a datasheet.json that ``fedpggan export`` wrote (not any file of that name)."""
    try:
        sheet = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(sheet, dict) and sheet.get("format") == 1 and isinstance(sheet.get("export"), dict)


STALE_SECONDS = 3600  # a staging folder untouched this long was left by an export killed outright


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it replaces ``out``, on any
    error, Ctrl-C or SIGTERM (a scheduler's time limit, ``docker stop``) it is deleted and ``out``
    is left as it was. Staging folders an export killed outright (SIGKILL) left are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a dataset to share should be readable
    try:
        with sigterm_as_interrupt():
            yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = staging.with_name(staging.name.replace(".partial-", ".old-"))
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(out: Path) -> None:
    for stale in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        if stale.is_dir() and time.time() - stale.stat().st_mtime > STALE_SECONDS:
            print(f"removing {stale}: the unfinished output of an export that was killed", file=sys.stderr)
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so the staging folder is cleaned up as on Ctrl-C
    (Python's default SIGTERM ends the process without running any cleanup)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an export called from a library): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
