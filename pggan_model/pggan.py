"""The Parallel-Generator GAN: two generators, their EMA copies, one discriminator.

D learns from real images and fakes of both generators; G1 and G2 learn against D
under a loss rule (see :mod:`pggan_model.losses`). Everything here is plain PyTorch:
the privacy mechanism (Opacus) lives in :mod:`fedpggan.privacy` and wraps D from outside.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pggan_model.losses import CASES, generator_rule_loss
from pggan_model.mean_embedding import RandomFourierFeatures, embedding_loss
from pggan_model.networks import Discriminator, Generator, ModelShape, init_weights

GENERATOR_CHOICES = ("1", "2", "both")


@dataclass(frozen=True)
class GANConfig:
    """Hyper-parameters of the adversarial game (shared by every trainer)."""

    loss_rule: str = "average"
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # EMA of generator weights used for sampling; the effective decay warms up as
    # min(ema_decay, (1 + t) / (10 + t)) so early samples are not dominated by the init.
    ema_decay: float = 0.995


class PGGAN(nn.Module):
    """G1, G2, their EMA copies and D, built from the data's shape."""

    def __init__(self, shape: ModelShape, config: GANConfig = GANConfig()) -> None:
        super().__init__()
        self.shape, self.config = shape, config
        self.g1, self.g2, self.d = Generator(shape), Generator(shape), Discriminator(shape)
        for net in (self.g1, self.g2, self.d):
            init_weights(net)
        self.ema1, self.ema2 = copy.deepcopy(self.g1).eval(), copy.deepcopy(self.g2).eval()
        for p in [*self.ema1.parameters(), *self.ema2.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    @property
    def single(self) -> bool:
        """True for the one-generator baseline: G2 is never trained nor sampled."""
        return self.config.loss_rule == "single"

    def model_config(self) -> dict:
        """What a checkpoint must match to be loaded into this model."""
        return {"shape": asdict(self.shape), "gan": asdict(self.config)}

    def draw_labels(self, n: int, prior: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Labels from the public class prior (uniform when None), never from private data."""
        if prior is None:
            return torch.randint(0, self.shape.num_classes, (n,), device=device)
        return torch.multinomial(prior.to(device), n, replacement=True)

    def latent(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randn(n, self.shape.latent_dim, device=device)

    @torch.no_grad()
    def fake_batch(
        self, n: int, prior: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed-size batch of ``n`` fakes for D: half from each generator (all from G1 in
        the single baseline), made by the trained (not EMA) generators."""
        device = next(self.parameters()).device
        if self.single:
            labels = self.draw_labels(n, prior, device)
            return self.g1(self.latent(n, device), labels), labels
        half = self.draw_labels(n // 2, prior, device)
        labels = torch.cat([half, self.draw_labels(n - n // 2, prior, device)])
        images = torch.cat(
            [self.g1(self.latent(n // 2, device), labels[: n // 2]),
             self.g2(self.latent(n - n // 2, device), labels[n // 2 :])]
        )
        return images, labels

    @torch.no_grad()
    def sample(
        self, n: int, labels: torch.Tensor | None = None, generator: str = "both", ema: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images in [-1, 1] and their labels; ``both`` draws half from each generator."""
        if generator not in GENERATOR_CHOICES:
            raise ValueError(f"generator must be one of {GENERATOR_CHOICES}, got {generator!r}")
        device = next(self.parameters()).device
        labels = self.draw_labels(n, None, device) if labels is None else labels.to(device)
        g1, g2 = (self.ema1, self.ema2) if ema else (self.g1, self.g2)
        if generator == "1" or (generator == "both" and self.single):
            return g1.eval()(self.latent(n, device), labels), labels
        if generator == "2":
            return g2.eval()(self.latent(n, device), labels), labels
        k = n // 2
        images = torch.cat(
            [g1.eval()(self.latent(k, device), labels[:k]), g2.eval()(self.latent(n - k, device), labels[k:])]
        )
        return images, labels

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move each EMA generator towards its trained generator (buffers are copied)."""
        t = int(self.ema_steps)
        decay = min(self.config.ema_decay, (1 + t) / (10 + t))
        for ema, net in ((self.ema1, self.g1), (self.ema2, self.g2)):
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - decay)
            for be, b in zip(ema.buffers(), net.buffers()):
                be.copy_(b)
        self.ema_steps += 1


class GeneratorTrainer:
    """Adam optimisers of G1 and G2 and the generator step under the loss rule.

    A generator step touches D and the generators only, never real data: in the federated
    run it is post-processing of the sites' differentially private discriminators.
    """

    def __init__(self, gan: PGGAN) -> None:
        self.gan = gan
        c = gan.config
        self.opt1 = torch.optim.Adam(gan.g1.parameters(), lr=c.lr_g, betas=(c.beta1, c.beta2))
        self.opt2 = torch.optim.Adam(gan.g2.parameters(), lr=c.lr_g, betas=(c.beta1, c.beta2))
        self.embedding: tuple[RandomFourierFeatures, torch.Tensor, float, torch.Tensor | None] | None = None

    def match_embedding(self, features: RandomFourierFeatures, class_means: torch.Tensor, weight: float,
                        classes: torch.Tensor | None = None) -> None:
        """Add ``weight`` x the class-conditional mean-embedding loss of the generators' mixture
        (an auxiliary loss; the target must come from a DP release when data are private), over the
        classes ``classes`` marks True (all when None)."""
        self.embedding = (features, class_means, weight, classes) if weight > 0 else None

    def step(self, batch_size: int, prior: torch.Tensor | None = None) -> dict[str, float]:
        """One update of both generators against the current D; returns losses and case counts."""
        gan = self.gan
        device = next(gan.parameters()).device
        d = gan.d
        was_training = d.training
        d.eval()
        d.requires_grad_(False)
        gan.g1.train(), gan.g2.train()
        labels = gan.draw_labels(batch_size, prior, device)
        x1 = gan.g1(gan.latent(batch_size, device), labels)
        logits1 = d(x1, labels)
        if gan.single:
            x2, logits2 = x1[:0], torch.zeros_like(logits1)
        else:
            x2 = gan.g2(gan.latent(batch_size, device), labels)
            logits2 = d(x2, labels)
        losses = generator_rule_loss(logits1, logits2, gan.config.loss_rule)
        loss = losses.loss
        if self.embedding is not None:
            features, means, weight, classes = self.embedding
            mixture_labels = labels if gan.single else torch.cat([labels, labels])
            emb = embedding_loss(features, torch.cat([x1, x2]), mixture_labels, means, classes)
            loss = loss + weight * emb
        self.update(loss)
        d.requires_grad_(True)
        d.train(was_training)
        out = {"loss_g1": float(losses.loss_g1), "loss_g2": float(losses.loss_g2)}
        if self.embedding is not None:  # NaN, not 0, where no class of the batch had a target: nothing was fitted
            out["loss_embedding"] = float(emb.detach()) if has_target(classes, labels) else math.nan
        if gan.single:
            out["loss_g2"] = float("nan")
        out.update({f"case_{k}": float(losses.cases[k]) for k in CASES})
        return out

    def embedding_step(self, batch_size: int, prior: torch.Tensor | None = None) -> float:
        """One update of both generators on the embedding loss alone (D is not used); returns
        that loss. Post-processing of the DP release, so it costs no privacy; whether it helps
        depends on how noisy the release is (see :func:`release_noise_ratio`)."""
        if self.embedding is None:
            raise RuntimeError("embedding_step needs a target: call match_embedding first")
        gan, (features, means, weight, classes) = self.gan, self.embedding
        device = next(gan.parameters()).device
        gan.g1.train(), gan.g2.train()
        labels = gan.draw_labels(batch_size, prior, device)
        if not has_target(classes, labels):  # nothing to learn from (a budget too small for the release)
            return math.nan
        images = gan.g1(gan.latent(batch_size, device), labels)
        if not gan.single:
            images = torch.cat([images, gan.g2(gan.latent(batch_size, device), labels)])
            labels = torch.cat([labels, labels])
        emb = embedding_loss(features, images, labels, means, classes)
        self.update(weight * emb)
        return float(emb.detach())

    def update(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss``, step the generators' optimisers and their EMA copies."""
        self.opt1.zero_grad(set_to_none=True)
        self.opt2.zero_grad(set_to_none=True)
        loss.backward()
        self.opt1.step()
        if not self.gan.single:
            self.opt2.step()
        self.gan.update_ema()

    def state_dict(self) -> dict:
        return {"opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt1.load_state_dict(state["opt1"])
        self.opt2.load_state_dict(state["opt2"])


def has_target(classes: torch.Tensor | None, labels: torch.Tensor) -> bool:
    """Whether any of ``labels`` is a class the embedding loss has a target for (``classes``: None = all)."""
    return classes is None or bool(classes[labels].any())


def mean_stats(stats: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """Per key, the mean over the steps that logged a number (D's accuracy on an empty Poisson batch is
    NaN); NaN for a key no step logged (loss_g2 under --loss-rule single)."""
    means = {}
    for key in keys:
        logged = [float(s[key]) for s in stats if not math.isnan(s[key])]
        means[key] = sum(logged) / len(logged) if logged else math.nan
    return means


def generator_step_summary(stats: list[dict[str, float]]) -> dict[str, float]:
    """A round's (or an epoch's) generator steps, as metrics.jsonl logs them: mean losses, summed rule cases."""
    keys = ("loss_g1", "loss_g2") + (("loss_embedding",) if stats and "loss_embedding" in stats[0] else ())
    return {**mean_stats(stats, keys), **{f"case_{c}": sum(s[f"case_{c}"] for s in stats) for c in CASES}}
