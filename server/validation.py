"""Check every update a site returns before it can touch the global model."""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

# An update that moves D by more than this multiple of D's own norm is not a few DP-SGD
# steps from the global model: it is broken or hostile. Local steps with Adam at the
# default learning rate move D by well under 1x.
MAX_RELATIVE_UPDATE = 2.0
# Among one round's valid updates, one this many times longer than the round's median update
# did not take the same few DP-SGD steps as the others (sites run the same steps, learning
# rate and clipping, so honest norms agree within a small factor): a scaled, model-replacement
# style update. Needs three or more updates for the median to be trustworthy.
MAX_UPDATE_VS_MEDIAN = 10.0
ROBUST_MIN_UPDATES = 3  # below it the median check is off, and median / trimmed mean are the plain mean


# What every train reply's privacy record holds: with DP the whole spend, without DP the steps.
SPEND_FIELDS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps")


# Every record a train reply may carry, and its kind (fedpggan/wire.py); anything else is read nowhere.
REPLY_RECORDS = {"status": ConfigRecord, "privacy": MetricRecord, "d": ArrayRecord, "g": ArrayRecord, "embedding": ArrayRecord}
OPTIONAL_SPEND_FIELDS = ("total_steps", "budget_epsilon")  # sent by every site since they exist; numbers when present


def reply_problem(content: Any, dp: bool) -> str | None:
    """None if a train reply carries every record and field the server reads, else the reason
    (a site on another version, or a broken one: the round goes on without it)."""
    for name in ("status", "privacy", "d"):
        if name not in content:
            return f"the reply lacks its '{name}' record"
    for name, kind in REPLY_RECORDS.items():
        if name in content and not isinstance(content[name], kind):
            return f"its '{name}' record is a {type(content[name]).__name__} (expected {kind.__name__})"
    status = content["status"].get("status")
    if status not in ("trained", "exhausted"):
        return f"status {status!r} is neither 'trained' nor 'exhausted'"
    privacy = content["privacy"]
    required = SPEND_FIELDS if dp else ("steps",)
    for name in (*required, *(f for f in OPTIONAL_SPEND_FIELDS if f in privacy)):
        value = privacy.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            return f"privacy field '{name}' = {value!r} is not a finite number >= 0"
    return None


def update_problem(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                   max_relative: float = MAX_RELATIVE_UPDATE) -> str | None:
    """None if ``update`` is a plausible new version of ``reference``, else the reason."""
    if set(update) != set(reference):
        missing, extra = set(reference) - set(update), set(update) - set(reference)
        return f"array names differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    delta_sq, ref_sq = 0.0, 0.0
    for key, ref in reference.items():
        value = update[key]
        if value.shape != ref.shape:
            return f"{key}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype} != {ref.dtype}"
        if value.is_floating_point():
            if not torch.isfinite(value).all():
                return f"{key}: non-finite values"
            delta_sq += float((value.double() - ref.double()).pow(2).sum())
            ref_sq += float(ref.double().pow(2).sum())
    ratio = (delta_sq ** 0.5) / max(ref_sq ** 0.5, 1e-12)
    if ratio > max_relative:
        return f"update norm is {ratio:.2f}x the model norm (limit {max_relative}x)"
    return None


def update_norm(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over the floating-point arrays (shapes already checked)."""
    return sum(float((update[k].double() - ref.double()).pow(2).sum())
               for k, ref in reference.items() if ref.is_floating_point()) ** 0.5


def outlier_problems(norms: list[float], factor: float = MAX_UPDATE_VS_MEDIAN) -> list[str | None]:
    """For each of a round's update norms: None, or why it is far longer than the round's median."""
    if len(norms) < ROBUST_MIN_UPDATES:
        return [None] * len(norms)
    median = sorted(norms)[len(norms) // 2]
    return [f"update norm {n:.3g} exceeds {factor}x the round's median update norm {median:.3g}"
            if n > factor * median else None for n in norms]


# How many noise standard deviations a release may lie from what its site's public record count allows: an honest
# release passes all but with probability ~1e-9, and a scaled one (a site taking over the embedding target) does not.
RELEASE_NOISE_SLACK = 6.0


def release_problem(released: torch.Tensor, num_records: int, sigma: float, count_share: float) -> str | None:
    """None if a site's embedding release is one its public record count allows, else the reason.

    Each record adds a vector of norm exactly 1 ([a phi, b] in its class's column, a^2 + b^2 = 1), and the
    release adds Gaussian noise of std ``sigma`` per entry: so the sum's norm is at most n plus the noise's,
    and its count row adds up to b n plus noise (pggan_model/mean_embedding.py)."""
    noise_norm = sigma * (math.sqrt(released.numel()) + RELEASE_NOISE_SLACK)
    norm = float(released.norm())
    if norm > num_records + noise_norm + 1e-6 * num_records:
        return (f"embedding release of norm {norm:.4g}, above what {num_records} records of norm 1 and the release's "
                f"noise allow ({num_records + noise_norm:.4g})")
    a, b = math.sqrt(1.0 - count_share), math.sqrt(count_share)
    counted = float(released[-1].sum())
    allowed = RELEASE_NOISE_SLACK * sigma * math.sqrt(released.shape[1]) + 1e-6 * num_records
    if abs(counted - b * num_records) > allowed:
        return (f"embedding release counting {counted / b:.4g} records, not the {num_records} the site declared "
                f"(beyond {RELEASE_NOISE_SLACK:g} noise standard deviations)")
    # per class: its feature sum holds one unit-norm phi per record it counts, so its norm is at most a/b times its count
    feature_noise = sigma * (math.sqrt(released.shape[0] - 1) + RELEASE_NOISE_SLACK)
    count_noise = RELEASE_NOISE_SLACK * sigma
    for k in range(released.shape[1]):
        norm_k, count_k = float(released[:-1, k].norm()), float(released[-1, k])
        if norm_k > (a / b) * (max(count_k, 0.0) + count_noise) + feature_noise + 1e-6 * num_records:
            return (f"embedding release whose class {k} features (norm {norm_k:.4g}) are more than its count "
                    f"({count_k / b:.4g} records) allows: one site would set that class's target")
    return None


def site_facts_problem(content: Any) -> str | None:
    """None if a site's answer to the server's query holds the public facts the run is built from, else the
    reason: a broken or hostile site must not crash the server before round 1 (and again at every resume)."""
    facts = content.get("site") if hasattr(content, "get") else None
    if not isinstance(facts, ConfigRecord):
        return "its answer holds no 'site' record"
    expected = {"site-id": str, "num-records": int, "image-size": int, "channels": int, "class-names": list,
                "dataset": str, "is-medical": bool}
    for key, kind in expected.items():
        value = facts.get(key)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            return f"'{key}' = {value!r} is not a {kind.__name__}"
    if facts["num-records"] < 1 or facts["image-size"] < 1 or facts["channels"] not in (1, 3):
        return (f"{facts['num-records']} records of {facts['image-size']} px and {facts['channels']} channel(s) "
                "is no data set")
    if len(facts["class-names"]) < 1 or not all(isinstance(c, str) for c in facts["class-names"]):
        return "'class-names' is not a list of names"
    return None
