"""Pictures people look at: sample grids (one row per class) and training curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pggan_model import PGGAN  # noqa: E402


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) to uint8 (N, H, W, C)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_sample_grid(gan: PGGAN, path: str | Path, class_names: Sequence[str], per_generator: int = 8,
                     title: str = "", seed: int = 0) -> None:
    """One row per class: ``per_generator`` EMA samples of G1, then of G2 (G1 only for 'single')."""
    device = next(gan.parameters()).device
    generators = ["1"] if gan.single else ["1", "2"]
    cols = per_generator * len(generators)
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)  # the same latents every time, so grids of a run are comparable
    rows = []
    for c in range(len(class_names)):
        labels = torch.full((per_generator,), c, dtype=torch.long, device=device)
        rows.append(torch.cat([gan.sample(per_generator, labels, generator=g)[0] for g in generators]))
    torch.set_rng_state(rng_state)
    fig, axes = plt.subplots(len(rows), 1, figsize=(cols * 0.6, len(rows) * 0.75 + 0.5), squeeze=False)
    for ax, row, name in zip(axes[:, 0], rows, class_names):
        img = to_uint8(row)  # (cols, H, W, C)
        strip = torch.cat(list(img), dim=1).numpy()
        ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
        ax.set_yticks([])
        ax.set_xticks([(i + 0.5) * img.shape[2] for i in range(0, cols, per_generator)])
        ax.set_xticklabels([f"G{g}" for g in generators], fontsize=7)
        ax.set_ylabel(str(name), rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves(rows: list[dict[str, Any]], x_key: str, panels: dict[str, list[str]], path: str | Path) -> None:
    """One panel per entry of ``panels`` (title -> metric keys), each key a line over ``x_key``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            pts = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_key)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
