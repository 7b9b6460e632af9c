"""Parallel-Generator GAN (PGGAN) in pure PyTorch: networks, losses, sampling, checkpoints."""

from pggan_model.checkpoint import gan_from_checkpoint, load_checkpoint, save_checkpoint
from pggan_model.losses import CASES, LOSS_RULES, discriminator_loss, generator_rule_loss, rule_weights
from pggan_model.networks import Discriminator, Generator, ModelShape
from pggan_model.pggan import GANConfig, GeneratorTrainer, PGGAN, generator_step_summary, mean_stats

__all__ = [
    "CASES", "LOSS_RULES", "Discriminator", "GANConfig", "Generator", "GeneratorTrainer", "ModelShape",
    "PGGAN", "discriminator_loss", "gan_from_checkpoint", "generator_rule_loss", "generator_step_summary",
    "load_checkpoint", "mean_stats", "rule_weights", "save_checkpoint",
]
