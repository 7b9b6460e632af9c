"""Pictures people look at: sample grids (one row per class) and training curves."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpggan.io import atomic_write_bytes  # noqa: E402
from pggan_model import PGGAN  # noqa: E402

LEGEND_LIMIT = 10  # more lines than this in a panel (e.g. one per site of 100): only the highlighted one is named


def save_figure(fig: Any, path: str | Path) -> None:
    """Write ``fig`` as a PNG atomically (a kill mid-write leaves the previous picture, never a cut one) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


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
    save_figure(fig, path)


def save_curves(rows: list[dict[str, Any]], x_key: str, panels: dict[str, list[str]], path: str | Path,
                y_label: str = "", highlight: dict[str, str] | None = None) -> None:
    """One panel per entry of ``panels`` (title -> metric keys), each key a line over ``x_key``.
    ``highlight`` (key -> legend label) draws those keys thick and black, e.g. the run's guarantee
    over the per-site epsilons; points are marked, so a one-round run still shows them."""
    highlight = highlight or {}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        named = []
        for key in keys:
            pts = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if not pts:
                continue
            style = {"color": "black", "linewidth": 2.2, "zorder": 3} if key in highlight else {"linewidth": 1.0}
            (line,) = ax.plot(*zip(*pts), marker="." if len(pts) <= 50 else None, label=highlight.get(key, key), **style)
            if key in highlight:
                named.append(line)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines and (len(ax.lines) <= LEGEND_LIMIT or named):
            ax.legend(handles=None if len(ax.lines) <= LEGEND_LIMIT else named, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
