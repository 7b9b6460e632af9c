"""Train a small CNN on a fedpggan export, test it on real images ("train synthetic, test real").

    python examples/train_on_synthetic.py --export DIR --real path/to/pneumoniamnist.npz
    python examples/train_on_synthetic.py --export DIR --real path/to/images   (an ImageFolder: test/ or itself)

Uses only numpy, torch and torchvision -- what a recipient of the export has -- and reads the
export's ImageFolder tree (``images/`` or ``images/train/``); the folder prefixes make
ImageFolder's class ids equal the npz labels, so the real ``test_labels`` match directly; a real
ImageFolder's class folders are matched by name to the class names in the export's datasheet.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import datasets, transforms


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, help="folder written by `fedpggan export`")
    p.add_argument("--real", required=True, help="real test data: a MedMNIST-layout npz (test_images, test_labels) or "
                                                 "an ImageFolder (its test/ folder, or the folder itself)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    images = Path(args.export) / "images"
    if not images.is_dir():
        p.error(f"--export {args.export}: no images/ folder; export with --format imagefolder (part of the default "
                "npz,imagefolder), or load an npz-only export's synthetic.npz with numpy")
    if not Path(args.real).exists():
        p.error(f"--real {args.real}: not found; pass a MedMNIST-layout npz (test_images, test_labels) or an ImageFolder")
    synthetic = images / "train" if (images / "train").is_dir() else images
    size = datasets.ImageFolder(synthetic)[0][0].size[0]  # the export's image size (square)
    test_x, test_y, names = real_test_split(Path(args.real), size)
    if not len(test_y):
        p.error(f"--real {args.real}: no test images found")
    channels = 1 if test_x.ndim == 3 else 3
    to_tensor = transforms.Compose([transforms.Grayscale() if channels == 1 else transforms.Lambda(lambda x: x),
                                    transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)])
    train = datasets.ImageFolder(synthetic, to_tensor)
    if names is not None:  # a real ImageFolder numbers its classes alphabetically: give each the export's id
        datasheet = Path(args.export) / "datasheet.json"
        if not datasheet.is_file():
            p.error(f"--export {args.export}: no datasheet.json, which names the export's classes; pass the whole export")
        ids = {name: k for k, name in enumerate(json.loads(datasheet.read_text())["dataset"]["class_names"])}
        if unknown := sorted({names[y] for y in test_y} - set(ids)):  # an empty folder holds nothing to label
            p.error(f"--real {args.real}: class folder(s) {', '.join(unknown)} are not classes of the export "
                    f"({', '.join(ids)})")
        test_y = np.array([ids[names[y]] for y in test_y], dtype=np.int64)
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


def real_test_split(real: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """uint8 images (N, H, W) or (N, H, W, 3), int64 labels (N,) of the real test split, and the class
    names the labels index (an ImageFolder's, its images resized to ``size``; None for an npz, whose
    labels are the export's ids). An empty class folder is allowed (torchvision >= 0.18)."""
    if real.is_file():
        with np.load(real) as data:
            return data["test_images"], data["test_labels"].reshape(-1).astype(np.int64), None
    folder = datasets.ImageFolder(real / "test" if (real / "test").is_dir() else real, allow_empty=True)
    images = [np.asarray(image.convert("RGB").resize((size, size))) for image, _ in folder]
    grey = all((image[..., :1] == image).all() for image in images)
    pixels = np.stack([image[..., 0] if grey else image for image in images]) if images else np.zeros((0, size, size), np.uint8)
    return pixels, np.array(folder.targets, dtype=np.int64), folder.classes


if __name__ == "__main__":
    main()
