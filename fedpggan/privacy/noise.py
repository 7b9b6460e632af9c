"""Where a data holder's DP randomness comes from: a secret key, or the run's public seed.

The Gaussian mechanism protects a record only from someone who cannot regenerate the noise.
So by default (``--noise-key secret``) every draw that touches private data -- the Poisson
masks of DP-SGD, its Gaussian noise and the embedding release's noise -- comes from
:class:`SecretNoise`: an AES-256-CTR keystream under a key only the data holder has. AES-CTR
is a cryptographic generator (what Opacus' ``secure_mode`` gets from torchcsprng, a package
this project's registry does not hold), so nobody can predict the draws from the released
weights or from earlier draws either.

``--noise-key seed`` keeps PyTorch's generator seeded from ``--seed`` (as simulated and
centralised runs drew before 2026-12-04): a run is then reproducible weight for weight, but
whoever knows the seed (it is in ``run.json``) can regenerate the noise, so the DP guarantee
does not hold against them. That is for benchmarks and reproducing published figures, never
for a release; a deployed site refuses it for a new run (client/site_round.py).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import types

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

NOISE_KEYS = ("secret", "seed")
SEEDED_NOISE = ("the DP noise is drawn from PyTorch's generator seeded with --seed, which run.json records: anyone with "
                "the seed can regenerate it, so the guarantee does not hold against them")
SEEDED_NOISE_WARNING = f"warning: --noise-key seed: {SEEDED_NOISE} (benchmarks only: never release this run)"
NOISE_DESCRIPTIONS = {
    "secret": "secret per-holder keys expanded by AES-256-CTR (cryptographic): only the data holder can regenerate its noise",
    "seed": f"{SEEDED_NOISE} (benchmarks only, not for release)",
}


class SecretNoise:
    """Uniform and Gaussian draws from AES-256-CTR under ``key`` (32 secret bytes) and ``label``.

    Privacy assumption: ``key`` never leaves the data holder. The same key and label give the
    same stream, which is how a site that crashed mid-round redraws the one output it paid for.
    """

    def __init__(self, key: bytes, label: str) -> None:
        if len(key) < 32:
            raise ValueError("a noise key needs at least 32 secret bytes")
        stream_key = hashlib.sha256(key + b"/" + label.encode()).digest()
        self._stream = Cipher(algorithms.AES(stream_key), modes.CTR(bytes(16))).encryptor()

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 draws, uniform on [0, 1) with 53 random bits each."""
        words = np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    def normal(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws of ``shape``, made in float64 as the sum of four Box-Muller
        samples halved: the construction Opacus' ``secure_mode`` uses against floating-point
        attacks on the Gaussian mechanism (Holohan & Braghin 2021, section 5.1)."""
        n = math.prod(shape)
        pairs = 2 * n  # four normals per output, two per Box-Muller pair
        u = self.uniform(2 * pairs).view(2, pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u in (0, 1]: log is finite
        angle = 2.0 * math.pi * u[1]
        draws = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)]).view(4, n)
        return (draws.sum(0) / 2.0).view(shape).to(dtype)

    def gaussian_like(self, like: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) draws shaped like ``like``, scaled in float64 before they are rounded to
        ``like``'s dtype and moved to its device."""
        return (self.normal(like.shape, torch.float64) * std).to(like)

    def poisson_indices(self, num_records: int, sample_rate: float) -> torch.Tensor:
        """Indices of a Poisson sample: each record independently with probability ``sample_rate``."""
        return torch.nonzero(self.uniform(num_records) < sample_rate).flatten()

    def noise_optimizer(self, optimizer: DPOptimizer) -> None:
        """Make ``optimizer`` draw its Gaussian noise from this stream.

        Opacus calls ``add_noise`` after clipping and before scaling and accounting; the
        replacement keeps its contract (std = noise multiplier x clipping norm, on each
        parameter's summed clipped gradient) and changes only where the draws come from."""
        def add_noise(opt: DPOptimizer) -> None:
            # as Opacus' fast-gradient-clipping optimizer (ghost mode) does, in case adaptive clipping adjusted it
            multiplier = getattr(opt, "_adjusted_noise_multiplier", opt.noise_multiplier)
            for p in opt.params:
                _check_processed_flag(p.summed_grad)
                noise = self.gaussian_like(p.summed_grad, multiplier * opt.max_grad_norm)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

        optimizer.add_noise = types.MethodType(add_noise, optimizer)


class SeededNoise:
    """Gaussian draws from PyTorch's generator seeded with ``seed`` (reproducible, not secret)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=dtype)


def new_secret_key() -> bytes:
    """32 bytes from the operating system's cryptographic generator."""
    return secrets.token_bytes(32)
