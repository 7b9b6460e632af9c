"""Differential privacy for the discriminator: accounting and the DP-SGD trainer."""

from fedpggan.config import GRAD_SAMPLE_MODES
from fedpggan.privacy.accounting import calibrate_noise, default_delta, epsilon_of, extend_history
from fedpggan.privacy.dp_discriminator import DiscriminatorTrainer, PrivacySettings

__all__ = [
    "GRAD_SAMPLE_MODES", "DiscriminatorTrainer", "PrivacySettings", "calibrate_noise",
    "default_delta", "epsilon_of", "extend_history",
]
