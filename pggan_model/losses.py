"""GAN losses (Goodfellow et al. 2014) and the PGGAN average-loss rule.

D is trained with binary cross-entropy, real = 1 and fake = 0. Generators use the
non-saturating loss l = -log sigmoid(D(G(z, y), y)) = softplus(-logit).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_RULES = ("average", "mean", "single")
CASES = ("neither", "only_g1", "only_g2", "both")


def discriminator_loss(logits: torch.Tensor, num_real: int) -> torch.Tensor:
    """Mean BCE over one batch whose first ``num_real`` rows are real and the rest fake.

    D sees real and fake images in one forward pass (one ``torch.cat``), which every
    Opacus grad-sample mode supports; the loss is averaged over the whole batch.
    """
    return F.binary_cross_entropy_with_logits(logits, real_fake_targets(logits, num_real))


def real_fake_targets(logits: torch.Tensor, num_real: int) -> torch.Tensor:
    """Targets 1 for the first ``num_real`` rows and 0 for the rest."""
    targets = torch.zeros_like(logits)
    targets[:num_real] = 1.0
    return targets


def generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample non-saturating generator loss, -log sigmoid(logit)."""
    return F.softplus(-logits)


class RuleLosses(NamedTuple):
    """What one generator step optimises, and how often each case of the rule occurred."""

    loss: torch.Tensor  # scalar: backward() gives each generator exactly its gradient
    loss_g1: torch.Tensor  # mean weighted loss of G1 (for logging)
    loss_g2: torch.Tensor
    cases: dict[str, int]  # counts of neither / only_g1 / only_g2 / both


def rule_weights(
    logits1: torch.Tensor, logits2: torch.Tensor, rule: str = "average"
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Per-sample weights (w1, w2) of the generators' losses under a loss rule.

    ``average`` (the PGGAN rule): for the pair (G1(z1, y), G2(z2, y)) a sample is judged
    real when sigmoid(D) > 0.5, i.e. logit > 0.
      - neither or both judged real: both learn from 1/2 (l1 + l2) -> w1 = w2 = 1/2;
      - only G1 judged real (G1 already fools D): only G2 learns, from l2 -> w = (0, 1);
      - only G2 judged real: only G1 learns, from l1 -> w = (1, 0).
    ``mean``: always 1/2 (l1 + l2). ``single``: G1 alone, the plain-GAN baseline.
    The rule reads D's scores of generated samples only, never real images.
    """
    real1, real2 = logits1 > 0, logits2 > 0
    only1, only2 = real1 & ~real2, real2 & ~real1
    cases = {
        "neither": int((~real1 & ~real2).sum()),
        "only_g1": int(only1.sum()),
        "only_g2": int(only2.sum()),
        "both": int((real1 & real2).sum()),
    }
    half = torch.full_like(logits1, 0.5)
    if rule == "average":
        w1 = torch.where(only1, 0.0, torch.where(only2, 1.0, half))
        w2 = torch.where(only2, 0.0, torch.where(only1, 1.0, half))
    elif rule == "mean":
        w1, w2 = half, half.clone()
    elif rule == "single":
        w1, w2 = torch.ones_like(logits1), torch.zeros_like(logits2)
    else:
        raise ValueError(f"unknown loss rule {rule!r}; choose one of {LOSS_RULES}")
    return w1, w2, cases


def generator_rule_loss(logits1: torch.Tensor, logits2: torch.Tensor, rule: str = "average") -> RuleLosses:
    """Combine both generators' losses under ``rule`` into one scalar to back-propagate.

    G1 and G2 share no parameters, so the gradient of sum(w1 * l1 + w2 * l2) with respect
    to G1 is exactly that of its own weighted loss; a weight of 0 gives a zero gradient.
    The weights are constants (the decision is not differentiated).
    """
    w1, w2, cases = rule_weights(logits1.detach(), logits2.detach(), rule)
    l1 = w1 * generator_loss(logits1)
    l2 = w2 * generator_loss(logits2)
    # Both generators learn from the batch mean of their weighted per-sample losses.
    loss_g1, loss_g2 = l1.mean(), l2.mean()
    return RuleLosses(loss_g1 + loss_g2, loss_g1.detach(), loss_g2.detach(), cases)
