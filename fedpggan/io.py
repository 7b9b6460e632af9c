"""Crash-safe file writing and content hashes for everything a run folder holds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from fedpggan.errors import FedPGGANError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a
    partial one: temp file in the same folder, fsync, rename, fsync of the folder (so that a
    power loss cannot undo the rename: a ledger entry must stay written once a round relies on it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def json_bytes(obj: Any) -> bytes:
    """How every JSON file of a run folder is written (so its hash can be known before it is)."""
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of the canonical JSON of ``obj`` (sorted keys, no spaces): equal content, equal hash."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_folder_path(path: str | Path | None, option: str = "--out") -> None:
    """A folder the command will write into must not be an existing file: say so before any work."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise FedPGGANError(f"{option} {path}: is a file; choose a folder path")


def dataset_slug(spec: str) -> str:
    """A dataset as a results file names it: ``../data/PhantomRGB10.npz`` -> ``phantomrgb10`` (no folder, no dot)."""
    return re.sub(r"[^a-z0-9]+", "-", Path(spec).name.lower().removesuffix(".npz")).strip("-") or "data"


def new_results_paths(stem: str | Path, option: str = "--results") -> tuple[Path, Path]:
    """The JSON and markdown files a benchmark writes for ``stem``, which must not exist yet: a
    benchmark's dated results are committed evidence, and a second run the same day must not replace
    them. Checked before any work, so a refused run costs nothing; the writer uses these very paths."""
    paths = (Path(f"{stem}.json"), Path(f"{stem}.md"))
    for path in paths:
        if path.exists():
            raise FedPGGANError(f"{path}: already exists (this benchmark ran today); move it away or pass another {option} folder")
    return paths
