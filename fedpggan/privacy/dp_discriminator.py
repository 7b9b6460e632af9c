"""Train the discriminator on one data holder's records, with DP-SGD or plainly.

Used by a federated site (client/) and by the centralised trainer alike. Privacy
assumptions (DP mode):
- real records enter D only through DP-SGD, accounted by Opacus: Poisson sampling at rate q,
  per-sample clipping to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier *
  max_grad_norm`` (clipped by book-keeping, the default, or by Opacus, below); the masks and
  the noise are drawn from the holder's secret stream when one is given (fedpggan.privacy.noise);
- fakes are generated from public inputs (generator weights, labels from the public class
  prior), in a batch of fixed size, so they neither depend on nor reveal the real batch;
- with ``fake_gradients="exact"`` (the default), the fakes go through D in a separate pass with
  Opacus' hooks off: their gradient is a function of D's current weights (already a function of
  the earlier noisy steps) and of public inputs, so adding it unclipped and un-noised is
  post-processing. The Gaussian mechanism on the real rows, and its accounting, are Opacus';
- or, with ``fake_gradients="clipped"``, real and fake images go through D in one forward pass
  (``torch.cat``), which every Opacus grad-sample mode supports (ghost clipping rejects two
  forward passes per step), and every row is clipped;
- with ``grad_sample_mode="bookkeeping"`` the clipped sum of the per-sample gradients comes from
  :class:`~fedpggan.privacy.bookkeeping.BookkeepingClipper` instead of Opacus' hooks (the same sum,
  tested equal, without storing a gradient per record); this trainer then draws the Poisson
  masks and the noise as Opacus' optimizer does, and an Opacus accountant accounts every step.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedpggan.config import FAKE_GRADIENTS
from fedpggan.privacy.accounting import History, epsilon_of
from fedpggan.privacy.bookkeeping import BookkeepingClipper
from fedpggan.privacy.noise import SecretNoise
from pggan_model import PGGAN, discriminator_loss
from pggan_model.losses import real_fake_targets



def sample_rate(num_records: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus uses for a loader of ``batch_size`` over ``num_records``."""
    return 1.0 / math.ceil(num_records / batch_size)


def fake_gradients(model: torch.nn.Module, fake: torch.Tensor, fake_labels: torch.Tensor,
                   params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """D's logits on the fakes and the exact gradient of their summed BCE loss (target 0): the
    unclipped part of the ``exact`` step, post-processing (module docstring)."""
    logits = model(fake, fake_labels)
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="sum")
    return logits, torch.autograd.grad(loss, params)


def mechanism_name(grad_sample_mode: str) -> str:
    """How the privacy ledger names D's DP-SGD: who clips the per-sample gradients."""
    if grad_sample_mode == "bookkeeping":
        return "DP-SGD on D, per-sample clipping by book-keeping, Opacus accountant"
    return f"Opacus DP-SGD on D ({grad_sample_mode})"


def strip_opacus_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Opacus wraps the model as ``_module``: drop that prefix when weights leave the wrapper."""
    return {k.removeprefix("_module."): v for k, v in state.items()}


@dataclass(frozen=True)
class PrivacySettings:
    """The DP-SGD mechanism of one data holder (fixed for a whole run)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str = "prv"
    # "bookkeeping" (fedpggan.privacy.bookkeeping) or an Opacus mode: the same clipped sum either way
    grad_sample_mode: str = "bookkeeping"
    # "exact": fakes skip per-sample gradients (faster; see the module docstring for why that
    # is post-processing); "clipped": fakes are clipped per sample with the real rows.
    fake_gradients: str = "exact"

    def __post_init__(self) -> None:
        if self.fake_gradients not in FAKE_GRADIENTS:  # a typo must not silently pick a path
            raise ValueError(f"fake_gradients must be one of {FAKE_GRADIENTS}, got {self.fake_gradients!r}")


class DiscriminatorTrainer:
    """Runs D steps on one holder's images; in DP mode, keeps the accountant history.

    ``history`` is the spend before this trainer was made (e.g. from earlier rounds): the
    Opacus accountant starts from it, so epsilon always covers every step ever taken.
    """

    def __init__(
        self,
        gan: PGGAN,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        privacy: PrivacySettings | None = None,
        history: History | None = None,
        prior: torch.Tensor | None = None,
        noise: SecretNoise | None = None,
    ) -> None:
        self.gan, self.batch_size, self.privacy, self.prior = gan, batch_size, privacy, prior
        self.images, self.labels = images, labels
        self.sample_rate = sample_rate(len(images), batch_size)  # what the site planned, calibrated and reserved
        # With DP: the Poisson masks and Gaussian noise come from ``noise`` (a secret keystream),
        # or when None from PyTorch's global generator as Opacus draws them (reproducible from the seed).
        self.noise = noise if privacy is not None else None
        self.device = next(gan.parameters()).device
        c = gan.config
        # Train a copy: Opacus attaches hooks and renames parameters (``_module.``).
        self.d = copy.deepcopy(gan.d).train()
        optimizer = torch.optim.Adam(self.d.parameters(), lr=c.lr_d, betas=(c.beta1, c.beta2))
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=privacy is None)
        self.criterion = None
        self.accountant = None
        self.clipper = None
        if privacy is not None:
            torch.backends.cudnn.benchmark = False  # Poisson batch shapes vary every step
        if privacy is None or privacy.grad_sample_mode == "bookkeeping":
            self.model, self.optimizer, self.loader = self.d, optimizer, loader
            if privacy is not None:
                self.clipper = BookkeepingClipper(self.d)
                self.accountant = create_accountant(privacy.accountant)
                self.accountant.history = list(history or [])
        else:
            engine = PrivacyEngine(accountant=privacy.accountant)
            engine.accountant.history = list(history or [])
            self.accountant = engine.accountant
            wrapped = engine.make_private(
                module=self.d,
                optimizer=optimizer,
                data_loader=loader,
                criterion=torch.nn.BCEWithLogitsLoss(),
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=privacy.grad_sample_mode,
            )
            if privacy.grad_sample_mode == "ghost":
                self.model, self.optimizer, self.criterion, self.loader = wrapped
            else:
                self.model, self.optimizer, self.loader = wrapped
            # Opacus takes q as 1 / len(its Poisson loader), whose length is int(1 / q): one batch short for
            # ceil(n / B) = 93, 99, 105, ... (float rounding), so it would account and divide by another q than
            # the one planned. Its sampler draws at the planned q; the accountant and the optimiser get it too.
            self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
            self.optimizer.expected_batch_size = self.expected_batch_size
            if self.noise is not None:
                self.noise.noise_optimizer(self.optimizer)
        self._batches = iter(self.loader)

    @property
    def history(self) -> History:
        """The accountant's history: (noise multiplier, sample rate, steps) entries."""
        return [] if self.accountant is None else [tuple(h) for h in self.accountant.history]

    def epsilon(self) -> float:
        if self.privacy is None:
            return math.inf
        return epsilon_of(self.history, self.privacy.delta, self.privacy.accountant, check_grid=False)  # within the plan

    @property
    def expected_batch_size(self) -> int:
        """B, which every DP step divides the noisy gradient sum by (as Opacus computes it)."""
        return int(len(self.images) * self.sample_rate)

    def _next_real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.noise is not None:  # the same Poisson sampling as Opacus' loader, from the secret stream
            picked = self.noise.poisson_indices(len(self.images), self.sample_rate)
            return self.images[picked], self.labels[picked]
        if self.clipper is not None:  # Opacus' Poisson sampler: one uniform draw per record
            picked = torch.nonzero(torch.rand(len(self.images)) < self.sample_rate).flatten()
            return self.images[picked], self.labels[picked]
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)

    def step(self) -> dict[str, float]:
        """One D step on a real batch and a fixed-size batch of fakes from both generators.

        The returned statistics are computed from real records: fine on the holder's own
        machine, never to be sent off a federated site in the clear.
        """
        real, real_labels = self._next_real_batch()
        real, real_labels = real.to(self.device), real_labels.to(self.device)
        fake, fake_labels = self.gan.fake_batch(self.batch_size, self.prior)
        n_real = real.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # images need no gradient; torch warns about Opacus' hooks
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if self.clipper is not None:
                logits = self._bookkeeping_step(real, real_labels, fake, fake_labels)
            elif self.privacy is not None and self.privacy.fake_gradients == "exact":
                logits = self._step_with_exact_fakes(real, real_labels, fake, fake_labels)
            else:
                logits = self.model(torch.cat([real, fake]), torch.cat([real_labels, fake_labels]))
                # ghost clipping: the wrapped criterion runs both backward passes
                loss = (self.criterion(logits, real_fake_targets(logits, n_real)) if self.criterion is not None
                        else discriminator_loss(logits, n_real))
                loss.backward()
                self.optimizer.step()
        with torch.no_grad():
            correct_real = (logits[:n_real] > 0).float().sum()
            correct_fake = (logits[n_real:] <= 0).float().mean()
            bce = F.binary_cross_entropy_with_logits(logits.detach(), real_fake_targets(logits, n_real))
        return {
            "d_loss": float(bce),
            "d_acc_real": float(correct_real / max(n_real, 1)) if n_real else float("nan"),
            "d_acc_fake": float(correct_fake),
        }

    def _step_with_exact_fakes(self, real: torch.Tensor, real_labels: torch.Tensor,
                               fake: torch.Tensor, fake_labels: torch.Tensor) -> torch.Tensor:
        """Step D along (sum of clipped real gradients + noise) / B + (exact gradient of the
        fakes' summed loss) / B, B the expected batch size; Opacus accounts the step. Returns
        the logits of [real, fake].

        Every image weighs 1/B, as in the one-pass step; only the fakes are no longer clipped.
        Only the real rows pay for per-sample gradients: that is why this path is faster."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.disable_hooks()  # the fakes' pass is plain autograd: no per-sample gradients
        try:
            fake_logits, fake_grads = fake_gradients(self.model, fake, fake_labels, params)
        finally:
            self.model.enable_hooks()
        if len(real):
            real_logits = self.model(real, real_labels)
            targets = torch.ones_like(real_logits)
            loss = (self.criterion(real_logits, targets) if self.criterion is not None
                    else F.binary_cross_entropy_with_logits(real_logits, targets))
            loss.backward()
        else:  # an empty Poisson batch: its clipped sum is zero (noise is still added)
            real_logits = fake_logits[:0]
            for p in params:
                if self.criterion is not None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = p.new_zeros((0, *p.shape))
        if self.optimizer.pre_step():  # clip the real rows, add noise, divide by B, account
            for p, g in zip(params, fake_grads):
                p.grad += g / self.expected_batch_size
            self.optimizer.original_optimizer.step()
        return torch.cat([real_logits, fake_logits])

    def _bookkeeping_step(self, real: torch.Tensor, real_labels: torch.Tensor,
                          fake: torch.Tensor, fake_labels: torch.Tensor) -> torch.Tensor:
        """The Opacus paths' update (fakes exact or clipped, see the module docstring), with the
        clipped sum from book-keeping: (clipped sum + N(0, (sigma C)^2)) / B, plus the exact
        fakes' gradient / B; one accountant step. Returns the logits of [real, fake]."""
        privacy, batch = self.privacy, self.expected_batch_size
        params = [p for p in self.d.parameters() if p.requires_grad]
        fake_logits, fake_grads = None, [0.0] * len(params)  # clipped fakes: their gradient is in the clipped sum
        if privacy.fake_gradients == "exact":
            fake_logits, fake_grads = fake_gradients(self.d, fake, fake_labels, params)
            rows, row_labels = real, real_labels
        else:
            rows, row_labels = torch.cat([real, fake]), torch.cat([real_labels, fake_labels])
        targets = real_fake_targets(rows.new_empty(len(rows)), len(real))
        sums, logits = self.clipper.clipped_sum(rows, row_labels, targets, privacy.max_grad_norm)
        std = privacy.noise_multiplier * privacy.max_grad_norm
        for p, fake_grad in zip(params, fake_grads):
            p.grad = (sums[p] + self._gaussian(p, std) + fake_grad) / batch
        self.optimizer.step()
        self.accountant.step(noise_multiplier=privacy.noise_multiplier, sample_rate=self.sample_rate)
        return logits if fake_logits is None else torch.cat([logits, fake_logits.detach()])

    def _gaussian(self, like: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) draws shaped like ``like``: from the secret stream, or as Opacus draws them
        (PyTorch's generator, reproducible from the seed)."""
        if self.noise is not None:
            return self.noise.gaussian_like(like, std)
        return torch.normal(0.0, std, like.shape, device=like.device, dtype=like.dtype)

    def train(self, steps: int) -> list[dict[str, float]]:
        """``steps`` D steps; afterwards ``gan.d`` holds the new weights."""
        stats = [self.step() for _ in range(steps)]
        self.gan.d.load_state_dict(strip_opacus_prefix(self.model.state_dict()))
        return stats
