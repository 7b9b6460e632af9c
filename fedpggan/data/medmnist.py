"""MedMNIST names: class names, where the npz files live, and the checked download.

The table mirrors the official ``medmnist/info.py`` (MedMNIST v2, 28x28 files) so the
package itself is not needed; the MD5s guard against truncated or tampered downloads.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

from fedpggan.errors import FedPGGANError

URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"
MULTI_LABEL = {"chestmnist"}

# name -> (MD5 of the official 28x28 npz, class names by label id)
MEDMNIST: dict[str, tuple[str, list[str]]] = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", [
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", [
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"]),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", [
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions"]),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", [
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", ["normal", "pneumonia"]),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", ["0", "1", "2", "3", "4"]),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", ["malignant", "normal, benign"]),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", [
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
        "monocyte", "neutrophil", "platelet"]),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", [
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
        "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
        "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"]),
    "organamnist": ("866b832ed4eeba67bfb9edee1d5544e6", [
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen"]),
    "organcmnist": ("0afa5834fb105f7705a7d93372119a21", [
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen"]),
    "organsmnist": ("e5c39f1af030238290b9557d9503af9d", [
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen"]),
}
LARGER_SIZES = (64, 128, 224)  # MedMNIST+ ships <name>_<size>.npz for these


def known_class_names(stem: str) -> list[str] | None:
    """Class names for a file stem such as ``breastmnist`` or ``breastmnist_64``."""
    base, _, size = stem.lower().rpartition("_")
    entry = MEDMNIST.get(stem.lower()) or (MEDMNIST.get(base) if size.isdigit() else None)
    return list(entry[1]) if entry else None


def search_dirs(data_dir: str | None) -> list[Path]:
    """Where a MedMNIST name is looked up, in order: --data-dir, $MEDMNIST_ROOT, ~/.medmnist."""
    dirs = [data_dir, os.environ.get("MEDMNIST_ROOT"), str(Path.home() / ".medmnist")]
    return [Path(d).expanduser() for d in dirs if d]


def resolve(name: str, data_dir: str | None, image_size: int | None) -> Path:
    """Path of ``name``'s npz file, downloading the 28x28 file when no directory has it."""
    if name in MULTI_LABEL:
        raise FedPGGANError(f"{name}: multi-label (several findings per image) is not supported; "
                            "choose a single-label dataset such as pneumoniamnist")
    dirs = search_dirs(data_dir)
    files = ([f"{name}_{image_size}.npz"] if image_size in LARGER_SIZES else []) + [f"{name}.npz"]
    for d in dirs:
        for f in files:
            if (d / f).is_file():
                return _warn_if_upsampled(d / f, name, image_size)
    made: list[Path] = []
    try:
        return _warn_if_upsampled(download(name, _first_writable(dirs, made)), name, image_size)
    except OSError as exc:
        for d in made:  # a failed download leaves no empty folders behind (e.g. a mistyped --data-dir)
            d.rmdir()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FedPGGANError(
            f"{name}: not found in {', '.join(map(str, dirs))} and download failed ({reason}); "
            f"put {name}.npz in one of them or pass --data-dir DIR "
            "(or name the built-in 'phantom' dataset to run offline)") from exc


def _warn_if_upsampled(path: Path, name: str, image_size: int | None) -> Path:
    """The 28x28 file used for a larger --image-size: the images are interpolated, with no more
    detail than 28 px, and everything downstream would describe them as larger; say so."""
    if image_size is not None and image_size > 28 and path.name == f"{name}.npz":
        larger = f"{name}_{image_size}.npz" if image_size in LARGER_SIZES else f"{name}_64.npz (or _128, _224)"
        print(f"warning: {path}: 28x28 images upsampled to {image_size} px, with no more detail than 28 px; put "
              f"{larger} beside it for real {image_size} px images", file=sys.stderr)
    return path


def _first_writable(dirs: list[Path], made: list[Path]) -> Path:
    """The first folder the download can write to; the folders created for it are added to
    ``made``, deepest first."""
    for d in dirs:
        missing = [p for p in (d, *d.parents) if not p.exists()]
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        made.extend(missing)
        if os.access(d, os.W_OK):
            return d
    raise OSError("no writable directory")


def download(name: str, folder: Path) -> Path:
    """Fetch the official file into ``folder``; kept only if its MD5 matches."""
    dest = folder / f"{name}.npz"
    part = dest.with_suffix(".npz.part")
    try:
        fetch(URL.format(name=name), part)
        if (got := _md5(part)) != MEDMNIST[name][0]:
            raise OSError(f"MD5 {got} != expected {MEDMNIST[name][0]}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def fetch(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` (tests replace this to simulate being offline)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
