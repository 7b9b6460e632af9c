"""Split record indices over federated sites: iid, label skew (Dirichlet) or quantity skew.

Hospitals differ in how many patients they see and in their case mix; the two skewed
schemes reproduce that heterogeneity in a controlled, seeded way.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpggan.data.dataset import ImageDataset
from fedpggan.errors import FedPGGANError

SCHEMES = ("iid", "dirichlet", "quantity")
DIRICHLET_TRIES = 50


def partition(labels: np.ndarray | torch.Tensor, num_sites: int, scheme: str = "iid",
              alpha: float = 0.5, min_per_site: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Disjoint, sorted index arrays covering every record, one per site, each holding at
    least ``min_per_site`` records. Same arguments, same result."""
    labels = _as_numpy(labels)
    n, need = len(labels), num_sites * max(min_per_site, 1)
    if num_sites < 1:
        raise FedPGGANError(f"--clients must be >= 1 (got {num_sites})")
    if scheme not in SCHEMES:
        raise FedPGGANError(f"--partition {scheme!r}: unknown scheme; choose one of {', '.join(SCHEMES)}")
    if scheme != "iid" and not 0 < alpha < float("inf"):
        raise FedPGGANError(f"--alpha {alpha}: must be a finite number > 0 (small = more skewed, large = closer to iid)")
    if need > n:
        raise FedPGGANError(f"--clients {num_sites} with --min-per-site {min_per_site} needs {need} records; "
                            f"the dataset has {n}: lower --clients or --min-per-site")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_sites)
    elif scheme == "quantity":
        parts = np.split(rng.permutation(n), np.cumsum(_sizes(n, num_sites, alpha, min_per_site, rng))[:-1])
    else:
        parts = _dirichlet(labels, num_sites, alpha, max(min_per_site, 1), rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _sizes(n: int, k: int, alpha: float, min_per_site: int, rng: np.random.Generator) -> np.ndarray:
    """Site sizes: ``min_per_site`` each plus a Dir(alpha) share of the remaining records."""
    base = max(min_per_site, 1)
    extra = n - k * base
    share = rng.dirichlet(np.full(k, alpha)) * extra
    sizes = base + np.floor(share).astype(np.int64)
    leftover = n - sizes.sum()
    sizes[np.argsort(share - np.floor(share))[::-1][:leftover]] += 1
    return sizes


def _dirichlet(labels: np.ndarray, k: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, Dir(alpha) proportions over sites. Redrawn up to DIRICHLET_TRIES times
    until every site is big enough; if none is, the best draw is topped up from the
    largest sites, so tiny alphas still succeed."""
    best: list[np.ndarray] = []
    for _ in range(DIRICHLET_TRIES):
        shares: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(idx)).astype(np.int64)
            for site, chunk in enumerate(np.split(idx, cuts)):
                shares[site].append(chunk)
        parts = [np.concatenate(s) for s in shares]
        if not best or min(map(len, parts)) > min(map(len, best)):
            best = parts
        if min(map(len, best)) >= min_size:
            return best
    return _top_up(best, min_size, rng)


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    parts = list(parts)
    while min(sizes := [len(p) for p in parts]) < min_size:
        small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
        moved = rng.permutation(len(parts[big]))
        give = min(min_size - sizes[small], sizes[big] - min_size)
        parts[small] = np.concatenate([parts[small], parts[big][moved[:give]]])
        parts[big] = parts[big][moved[give:]]
    return parts


def partition_summary(labels: np.ndarray | torch.Tensor, parts: list[np.ndarray],
                      class_names: list[str]) -> list[dict]:
    """Per site: ``{"site": i, "n": records, "per_class": {class name: count}}``."""
    labels = _as_numpy(labels)
    rows = []
    for site, idx in enumerate(parts):
        counts = np.bincount(labels[idx], minlength=len(class_names))
        rows.append({"site": site, "n": int(len(idx)),
                     "per_class": {name: int(c) for name, c in zip(class_names, counts)}})
    return rows


def site_sha256(data: ImageDataset, parts: list[np.ndarray]) -> list[str]:
    """Each site's content hash (ImageDataset.sha256), for partition.json: what pins a simulated
    site's records for a resume and for the audit's membership check."""
    return [data.subset(idx).sha256 for idx in parts]


def check_same_partition(recorded: list[dict], data: ImageDataset, parts: list[np.ndarray], fix: str) -> None:
    """Refuse data whose split into sites differs from the one ``recorded`` (partition.json) holds:
    a record moved between sites is charged at both, beyond either site's accounted epsilon, and
    the audit would judge the wrong members. Runs recorded without hashes are not checked."""
    for row, now in zip(recorded, site_sha256(data, parts)):
        if "sha256" in row and row["sha256"] != now:
            raise FedPGGANError(f"partition.json: site {row['site']}'s records differ from those the run began with "
                                f"(the data changed since); {fix}")
    if len(recorded) != len(parts):
        raise FedPGGANError(f"partition.json: {len(recorded)} sites recorded, {len(parts)} rebuilt; {fix}")


def partition_table(labels: np.ndarray | torch.Tensor, parts: list[np.ndarray], class_names: list[str]) -> str:
    """Fixed-width text table: one row per site (records, per-class counts) and a total row."""
    rows = partition_summary(labels, parts, class_names)
    body = [[str(r["site"]), str(r["n"]), *map(str, r["per_class"].values())] for r in rows]
    body.append(["total", str(sum(r["n"] for r in rows)),
                 *(str(sum(r["per_class"][c] for r in rows)) for c in class_names)])
    header = ["site", "n", *class_names]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(row, widths))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def _as_numpy(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)
