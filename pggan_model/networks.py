"""Class-conditional generator and discriminator.

The generator is a DCGAN-style up-sampler (it may use BatchNorm: it never sees private
data). The discriminator is trained with DP-SGD, so it is small, uses GroupNorm (a
per-sample normalisation, which keeps one record's gradient independent of the others
in the batch) and conditions on the label with a projection head (Miyato & Koyama 2018),
which Opacus supports through plain ``nn.Embedding`` and ``nn.Linear`` layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedpggan.errors import FedPGGANError


@dataclass(frozen=True)
class ModelShape:
    """What the networks need to know about the data: taken from the dataset, never fixed."""

    image_size: int
    channels: int
    num_classes: int
    latent_dim: int = 64
    g_width: int = 32
    d_width: int = 32
    # Spectral norm on D's layers: the SNGAN-style baseline only. Opacus cannot train it,
    # so it is refused together with DP (see fedpggan.build.build_gan).
    d_spectral_norm: bool = False


def upsampling_plan(image_size: int, option: str = "--image-size") -> tuple[int, int]:
    """Return (start size, number of 2x up-samplings) so that start * 2**n == image_size.

    28 -> (7, 2); 32 -> (4, 3); 64 -> (4, 4). The start size lies in [4, 7]. ``option`` names
    where the size came from in the error (a flag, or a key of a site's config file).
    """
    size, n = image_size, 0
    while size > 7 and size % 2 == 0:
        size, n = size // 2, n + 1
    if not 4 <= size <= 7 or n < 2:
        raise FedPGGANError(
            f"{option} {image_size} is not supported: use a size s * 2**n with s in 4..7 "
            "and n >= 2 (e.g. 28, 32, 64, 128)"
        )
    return size, n


class Generator(nn.Module):
    """G(z, y): latent vector and class label to an image in [-1, 1]."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.start, n_up = upsampling_plan(shape.image_size)
        # Channels halve at every up-sampling: at 28x28 the default width 32 gives 64 -> 32 -> 16.
        widths = [shape.g_width * 2 ** (n_up - 1) // 2**i for i in range(n_up + 1)]
        self.start_channels = widths[0]
        self.embed = nn.Embedding(shape.num_classes, shape.latent_dim)
        self.project = nn.Sequential(
            nn.Linear(2 * shape.latent_dim, widths[0] * self.start**2, bias=False),
            nn.BatchNorm1d(widths[0] * self.start**2),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        channels = widths[-1]
        blocks += [nn.Conv2d(channels, shape.channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(labels)], dim=1))
        return self.body(h.view(-1, self.start_channels, self.start, self.start))


class Discriminator(nn.Module):
    """D(x, y): one real-vs-fake logit per image; passes Opacus' strict validator."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        _, n_down = upsampling_plan(shape.image_size)
        layers: list[nn.Module] = []
        channels, width = shape.channels, shape.d_width
        for i in range(n_down + 1):
            layers += [nn.Conv2d(channels, width, 4 if i < n_down else 3, stride=2, padding=1)]
            if i > 0:
                layers += [nn.GroupNorm(min(8, width // 4), width)]
            layers += [nn.LeakyReLU(0.2)]
            channels, width = width, min(width * 2, 8 * shape.d_width)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)
        self.embed = nn.Embedding(shape.num_classes, channels)
        if shape.d_spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))
        return self.head(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) for conv/linear weights, N(1, 0.02) for norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
