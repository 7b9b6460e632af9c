"""Everything that crosses the wire between the server and a site, in one place.

Server -> site ("query"):  ConfigRecord "config" (run id, run options).
Site -> server (query reply): ConfigRecord "site" with public facts only: site id, record
    count (declared public), image size, channels, class names, dataset name.
Server -> site ("train"): ArrayRecord "d" (global D), ArrayRecord "g" (G1/G2 weights,
    keys prefixed "g1." / "g2."), ConfigRecord "config" (run options + round + run id).
Site -> server (train reply): ArrayRecord "d" (D after local DP-SGD), ArrayRecord "g" only
    with --generator-training local, ArrayRecord "embedding" only with --embedding-weight > 0
    (the site's one-shot DP release of its class-mean embedding: a noisy sum, never per-record
    values), MetricRecord "privacy" (the spend), ConfigRecord "status" (trained / replayed /
    exhausted, site id, accountant).
No image, label, per-record statistic or label count is ever put in a message.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pggan_model import PGGAN

PRIVACY_METRICS = (
    "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "total_steps", "budget_epsilon",
)
PUBLIC_SITE_FACTS = ("site-id", "num-records", "image-size", "channels", "class-names", "dataset", "is-medical")


def generator_arrays(gan: PGGAN) -> ArrayRecord:
    """G1 and G2 (weights and BatchNorm buffers) as one ArrayRecord."""
    state = {f"g1.{k}": v for k, v in gan.g1.state_dict().items()}
    state.update({f"g2.{k}": v for k, v in gan.g2.state_dict().items()})
    return ArrayRecord(state)


def load_generators(gan: PGGAN, record: ArrayRecord) -> None:
    state = record.to_torch_state_dict()
    gan.g1.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("g1.")})
    gan.g2.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("g2.")})


def arrays_sha256(*records: ArrayRecord) -> str:
    """Content hash of the arrays a site received: a replayed round must see the same input."""
    h = hashlib.sha256()
    for record in records:
        for key, array in sorted(record.items()):
            h.update(key.encode())
            h.update(array.data)
    return h.hexdigest()


def train_content(gan: PGGAN, config: dict[str, Any]) -> RecordDict:
    return RecordDict({
        "d": ArrayRecord(gan.d.state_dict()),
        "g": generator_arrays(gan),
        "config": ConfigRecord(config),
    })


def state_dict_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def reply_content(d_state: dict[str, torch.Tensor], privacy: dict[str, float], status: dict[str, Any],
                  g_record: ArrayRecord | None = None, embedding: torch.Tensor | None = None) -> RecordDict:
    content = RecordDict({
        "d": ArrayRecord(d_state),
        "privacy": MetricRecord({k: privacy[k] for k in PRIVACY_METRICS if k in privacy}),
        "status": ConfigRecord(status),
    })
    if g_record is not None:
        content["g"] = g_record
    if embedding is not None:
        content["embedding"] = ArrayRecord({"sum": embedding})
    return content
