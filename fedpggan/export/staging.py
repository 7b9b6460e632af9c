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
    """Refuse a file, a non-empty folder (unless ``overwrite``), the run folder or its parents,
    and any other run folder: an export may replace an export, never a run and its ledger."""
    target, run = out.resolve(), run_root.resolve()
    if target == run or target in run.parents:
        raise FedPGGANError(f"--out {out}: would replace the run folder {run_root}; choose a folder outside it")
    check_folder_path(out)
    if out.is_dir() and any((out / name).exists() for name in ("run.json", "privacy_ledger.json")):
        raise FedPGGANError(f"--out {out}: holds a training run (run.json / privacy_ledger.json), which --overwrite "
                            "never replaces; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FedPGGANError(f"--out {out}: folder is not empty; choose a new folder or pass --overwrite to replace it")


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
