"""One file per checkpoint: G1, G2, their EMAs, D, optimiser states, RNG states, config.

Files are written atomically and their SHA-256 is returned so the run folder (and the
privacy ledger) can record it; loading checks that the model config matches.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_bytes, sha256_bytes
from pggan_model.networks import ModelShape
from pggan_model.pggan import PGGAN, GANConfig

FORMAT_VERSION = 1


# What np.random.get_state() pickles to, allowed through torch.load(weights_only=True)
NUMPY_RNG_TYPES = [np.dtype, np.ndarray, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: str | Path, gan: PGGAN, **extra: Any) -> str:
    """Save ``gan`` plus ``extra`` (optimiser states, run config, round, ...); return SHA-256."""
    payload = {
        "format": FORMAT_VERSION,
        "model_config": gan.model_config(),
        "state_dict": {k: v.detach().cpu() for k, v in gan.state_dict().items()},
        "rng": rng_state(),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file; a missing or unreadable file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FedPGGANError(f"{path}: checkpoint not found; pass a run folder with checkpoints/ or a .pt file")
    try:  # tensors, plain containers and the numpy RNG state only: a checkpoint is data, never code to run
        with torch.serialization.safe_globals(NUMPY_RNG_TYPES):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files (and for pickled code)
        raise FedPGGANError(f"{path}: checkpoint is unreadable ({type(exc).__name__}); use an earlier checkpoint") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise FedPGGANError(f"{path}: not a fedpggan checkpoint (format {FORMAT_VERSION} expected)")
    return payload


def load_checkpoint(path: str | Path, gan: PGGAN) -> dict[str, Any]:
    """Load weights into ``gan``; refuse a checkpoint made for another model config."""
    payload = read_checkpoint(path)
    if payload["model_config"] != gan.model_config():
        diff = sorted(
            f"{section}.{k}"
            for section in ("shape", "gan")
            for k in gan.model_config()[section]
            if payload["model_config"].get(section, {}).get(k) != gan.model_config()[section][k]
        )
        raise FedPGGANError(
            f"{path}: checkpoint config does not match this model ({', '.join(diff)} differ); "
            "use the options the run was trained with"
        )
    gan.load_state_dict(payload["state_dict"])
    return payload


def gan_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[PGGAN, dict[str, Any]]:
    """Rebuild the model a checkpoint was made for (for evaluation and export)."""
    payload = read_checkpoint(path)
    try:
        config = payload["model_config"]
        gan = PGGAN(ModelShape(**config["shape"]), GANConfig(**config["gan"]))
        gan.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:  # a model config or weights this version cannot build
        raise FedPGGANError(f"{path}: this fedpggan version cannot build the checkpoint's model ({type(exc).__name__}); "
                            "use a checkpoint this version wrote") from exc
    return gan.to(device).eval(), payload
