"""All-or-nothing output: build the export in a hidden sibling folder, move it in at the end.

An interrupted or failed export leaves no half-written dataset behind, and ``--overwrite``
keeps the previous export intact until the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpggan.errors import FedPGGANError
from fedpggan.io import check_folder_path


def check_target(out: Path, run_root: Path, overwrite: bool) -> None:
    """Refuse a file, the run folder, a folder inside it or above it, and a non-empty folder
    unless ``overwrite`` and it is an earlier export (its datasheet.json): an export may replace
    an export, never a run, its checkpoints or anyone's other files."""
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
    if not (out / "datasheet.json").is_file() or any(out.rglob("run.json")) or any(out.rglob("privacy_ledger.json")):
        raise FedPGGANError(f"--out {out}: not an earlier export (no datasheet.json, or it holds a training run), which "
                            "--overwrite never replaces; choose a new or empty folder")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it replaces ``out``, on any
    error (or Ctrl-C) it is deleted and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a dataset to share should be readable
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = staging.with_name(staging.name.replace(".partial-", ".old-"))
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
