"""Shared test helpers: tiny configurations that run in seconds on a 2-core CPU."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpggan.config import RunConfig

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)
# Ray, for the simulation tests: keep accelerator variables as they are for zero-GPU actors (and so
# silence its FutureWarning about that), and show every actor's log line.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
warnings.filterwarnings("ignore", module="opacus")


def tiny_config(out: Path, **overrides) -> RunConfig:
    """A centralised/federated config small enough for unit tests."""
    base = dict(dataset="phantom", epochs=1, d_steps=2, batch_size=32, g_batch_size=32, g_width=16, d_width=8,
                latent_dim=16, epsilon=math.inf, out=str(out), clients=3, rounds=2, local_steps=2, g_steps=1,
                sample_every=1, min_per_site=10)
    base.update(overrides)
    return RunConfig(**base).validate()


def write_ssh_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A SuperNode key as flower-supernode reads it (OpenSSH, NIST P-384; ssh-keygen -t ecdsa -b 384) and its .pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH))
    return key


def fix_today(monkeypatch: pytest.MonkeyPatch, module, day: str = "2026-12-07") -> str:
    """Make ``module``'s ``date.today()`` a fixed day, so a test that names today's results file cannot straddle
    midnight (and start the real work a refusal would have spared); returns the day."""
    import datetime

    class FixedDate(datetime.date):
        @classmethod
        def today(cls):
            return cls.fromisoformat(day)

    monkeypatch.setattr(module, "date", FixedDate)
    return day
