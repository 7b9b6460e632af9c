"""Train a small CNN on a fedpggan export, test it on real images ("train synthetic, test real").

    python examples/train_on_synthetic.py --export DIR --real path/to/pneumoniamnist.npz

Uses only numpy, torch and torchvision -- what a recipient of the export has -- and reads the
export's ImageFolder tree (``images/`` or ``images/train/``); the folder prefixes make
ImageFolder's class ids equal the npz labels, so the real ``test_labels`` match directly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import datasets, transforms


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, help="folder written by `fedpggan export`")
    p.add_argument("--real", required=True, help="real MedMNIST-layout npz with test_images/test_labels")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    images = Path(args.export) / "images"
    if not images.is_dir():
        p.error(f"--export {args.export}: no images/ folder; export with --format imagefolder (part of the default "
                "npz,imagefolder), or load an npz-only export's synthetic.npz with numpy")
    if not Path(args.real).is_file():
        p.error(f"--real {args.real}: no such file; pass a MedMNIST-layout npz with test_images and test_labels")

    with np.load(args.real) as real:
        test_x, test_y = real["test_images"], real["test_labels"].reshape(-1).astype(np.int64)
    channels = 1 if test_x.ndim == 3 else 3
    to_tensor = transforms.Compose([transforms.Grayscale() if channels == 1 else transforms.Lambda(lambda x: x),
                                    transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)])
    train = datasets.ImageFolder(images / "train" if (images / "train").is_dir() else images, to_tensor)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)

    net = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, len(train.classes)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    x = torch.from_numpy(test_x).float().div(127.5).sub(1)
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    x = nn.functional.interpolate(x, size=train[0][0].shape[-2:], mode="bilinear", antialias=True)
    with torch.no_grad():
        accuracy = float((net(x).argmax(1).numpy() == test_y).mean())
    baseline = float(np.bincount(test_y).max() / len(test_y))
    print(f"trained on {len(train)} synthetic images ({', '.join(train.classes)}); "
          f"accuracy on {len(test_y)} real test images: {accuracy:.3f} (majority class: {baseline:.3f})")
    return accuracy


if __name__ == "__main__":
    main()
