"""What one export asks for, parsed from the command line and checked before any work starts.

Class counts are fixed numbers (from ``--per-class`` or ``--n`` split by a *public* prior),
never anything read from the private training data: the export must stay post-processing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fedpggan.config import class_prior
from fedpggan.errors import FedPGGANError

FORMATS = ("npz", "imagefolder")
SPLITS = ("train", "val", "test")
GENERATORS = ("1", "2", "both")
DEVICES = ("cpu", "auto", "cuda")
DEFAULT_N = 1000
MAX_IMAGE_SIZE = 1024  # resampling 28x28 generators further adds pixels, not detail
CHUNK_BYTES = 256 * 2**20  # float32 images generated at a time: bounds memory at large --image-size


@dataclass(frozen=True)
class ExportOptions:
    """Everything that determines the exported bytes (with the run and checkpoint), plus safety flags.

    ``n`` and ``per_class`` are exclusive; neither means ``n = 1000``. ``class_prior`` is
    'uniform', inline weights ('0.3,0.7') or a JSON/text file of per-class weights.
    ``split`` holds train/val/test fractions. ``device`` defaults to CPU because only CPU
    exports are bit-for-bit reproducible."""

    n: int | None = None
    per_class: tuple[int, ...] | None = None
    class_prior: str = "uniform"
    generator: str = "both"
    checkpoint: str | None = None
    seed: int = 0
    formats: tuple[str, ...] = FORMATS
    split: tuple[float, float, float] = (1.0, 0.0, 0.0)
    image_size: int | None = None
    device: str = "cpu"
    chunk_size: int = 500
    overwrite: bool = False
    audit_report: str | None = None  # where `fedpggan audit --out` wrote (default: the run folder)
    allow_unaudited: bool = False
    allow_no_dp: bool = False

    def __post_init__(self) -> None:
        if self.n is not None and self.per_class is not None:
            raise FedPGGANError("--n and --per-class are exclusive; give one of them")
        if self.per_class is not None and self.class_prior.strip().lower() != "uniform":
            raise FedPGGANError("--class-prior applies to --n only (--per-class fixes every class's count): drop one of them")
        if self.n is not None and self.n < 1:
            raise FedPGGANError(f"--n {self.n} is invalid: it must be >= 1")
        if self.per_class is not None and (min(self.per_class) < 0 or sum(self.per_class) < 1):
            raise FedPGGANError("--per-class: counts must be >= 0 and add up to at least 1")
        if self.generator not in GENERATORS:
            raise FedPGGANError(f"--generator {self.generator!r} is invalid: choose 1, 2 or both")
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise FedPGGANError(f"--format {','.join(self.formats)!r} is invalid: use npz, imagefolder or both")
        if self.image_size is not None and not 4 <= self.image_size <= MAX_IMAGE_SIZE:
            raise FedPGGANError(f"--image-size {self.image_size} is invalid: it must be between 4 and {MAX_IMAGE_SIZE}")
        if self.chunk_size < 1:
            raise FedPGGANError(f"--chunk-size {self.chunk_size} is invalid: it must be >= 1")
        if self.seed < 0:
            raise FedPGGANError(f"--seed {self.seed} is invalid: it must be >= 0")
        if self.device not in DEVICES:
            raise FedPGGANError(f"--device {self.device!r} is invalid: choose cpu, auto or cuda")

    def images_per_chunk(self, size: int, channels: int) -> int:
        """``chunk_size``, or fewer when that many float32 images of ``size`` would pass CHUNK_BYTES (the
        bytes written do not depend on it: every image's latent is fixed by its index)."""
        return max(1, min(self.chunk_size, CHUNK_BYTES // (4 * channels * size * size)))

    def class_counts(self, class_names: list[str]) -> list[int]:
        """Exact images per class: ``--per-class`` as given, else ``--n`` split by the prior."""
        if self.per_class is not None:
            counts = list(self.per_class) * len(class_names) if len(self.per_class) == 1 else list(self.per_class)
            if len(counts) != len(class_names):
                raise FedPGGANError(f"--per-class has {len(counts)} counts but the run has {len(class_names)} classes; "
                                    "give one count, or one per class")
            return counts
        return apportion(self.n or DEFAULT_N, self.prior_weights(class_names))

    def prior_weights(self, class_names: list[str]) -> list[float]:
        """Normalised public class weights for ``--n``, one per class in label order."""
        spec = self.class_prior.strip()
        if spec.lower() == "uniform":
            return [1.0 / len(class_names)] * len(class_names)
        path = Path(spec).expanduser()
        if path.is_file():
            weights = read_prior_file(path, class_names)
        elif all(_is_number(w) for w in spec.split(",")):
            weights = class_prior(spec) or []
        else:
            raise FedPGGANError(f"--class-prior {spec}: no such file; give 'uniform', a file of weights "
                                "or weights like 0.3,0.7")
        if len(weights) != len(class_names):
            raise FedPGGANError(f"--class-prior {spec}: has {len(weights)} weights but the run has "
                                f"{len(class_names)} classes; give one weight per class")
        return weights


def read_prior_file(path: Path, class_names: list[str]) -> list[float]:
    """Weights from a JSON list, a JSON object keyed by class name (or label id), or plain text
    of numbers separated by commas, spaces or newlines."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FedPGGANError(f"--class-prior {path}: unreadable as text ({exc}); give a file of weights such as "
                            "0.3,0.7 or a JSON list") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = text.replace(",", " ").split()
    if isinstance(data, dict):
        keys = class_names if set(data) == set(class_names) else [str(k) for k in range(len(class_names))]
        if set(data) != set(keys):
            raise FedPGGANError(f"--class-prior {path}: keys {sorted(data)} are not the run's classes "
                                f"{class_names}; key the weights by class name")
        data = [data[k] for k in keys]
    try:
        weights = [float(w) for w in (data if isinstance(data, list) else [data])]
    except (TypeError, ValueError):
        raise FedPGGANError(f"--class-prior {path}: not a list of numbers; write e.g. [0.3, 0.7] or 0.3,0.7") from None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise FedPGGANError(f"--class-prior {path}: weights must be finite, >= 0 and not all zero")
    return [w / sum(weights) for w in weights]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder), so the
    counts are exact and the same every time."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def parse_per_class(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise FedPGGANError(f"--per-class {text!r} is invalid: "
                            "give one count (K) or one per class (K1,K2,...)") from None


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.8/0.1/0.1' (or '0.9/0.1', '1') -> train/val/test fractions adding up to 1."""
    try:
        parts = [float(v) for v in text.split("/")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 or not math.isfinite(p) for p in parts) or not parts[0] > 0 \
            or abs(sum(parts) - 1) > 1e-6:
        raise FedPGGANError(f"--split {text!r} is invalid: "
                            "give train/val/test fractions adding up to 1, e.g. 0.8/0.1/0.1")
    return tuple(parts + [0.0] * (3 - len(parts)))  # type: ignore[return-value]


def parse_formats(text: str) -> tuple[str, ...]:
    """'npz,imagefolder' -> ('npz', 'imagefolder'); checked by :class:`ExportOptions`."""
    return tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
