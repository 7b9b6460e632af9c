"""Everything that crosses the wire between the server and a site, in one place.

Server -> site ("query"):  ConfigRecord "config" (run id, run options).
Site -> server (query reply): ConfigRecord "site" with public facts only (PUBLIC_SITE_FACTS): site id,
    record count (declared public), image size, channels, class names, dataset name, whether it is medical.
Server -> site ("train"): ArrayRecord "d" (global D), ArrayRecord "g" (G1/G2 weights,
    keys prefixed "g1." / "g2."), ConfigRecord "config" (run options + round + run id).
Site -> server (train reply): ArrayRecord "d" (D after local DP-SGD), ArrayRecord "g" only
    with --generator-training local, ArrayRecord "embedding" only with --embedding-weight > 0 and
    --release-aggregation plain
    (the site's one-shot DP release of its class-mean embedding: a noisy sum, never per-record
    values), MetricRecord "privacy" (the spend), ConfigRecord "status" ("status": trained or
    exhausted; "site-id"; "replayed": re-sent from the site's cache; "recovered": recomputed after
    a crash mid-round; "t-compute": the site's seconds of data loading and training).

Secure release (--release-aggregation secure), once before round 1:
Server -> site ("query.release_keys"): ConfigRecord "config".
Site -> server: ConfigRecord "key": "public-key" (a one-run X25519 key) and, from a site with a
    roster (peer-keys), "signer" (its SuperNode public key, OpenSSH) and "signature".
Server -> site ("query.release_masked"): "config" and ConfigRecord "keys": the lists
    "public-keys", "signers" and "signatures", one entry per site in one order (b"" where a
    site signed nothing).
Site -> server: ArrayRecord "masked" ({"sum": its share plus pairwise masks and a self-mask,
    uint64 viewed as int64}) and
    ConfigRecord "check" ("verified-signers": the peers whose signatures it checked; none =
    it took the list on trust; "share-made-for": the N of the first key list it made its share for;
    "seed-commitment": SHA-256 of its self-mask seed).
Server -> site ("query.release_reveal"), once every vector of the attempt is in: "config" and
    "keys" (the attempt's key list).
Site -> server: ConfigRecord "reveal": "self-mask-seed" (32 bytes; a site reveals one per run).
    A site that fails the first step is left out of the key list; after a failure in the second
    step the others repeat both with fresh keys.
No image, label, per-record statistic or label count is ever put in a message.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpggan.errors import FedPGGANError
from fedpggan.privacy.peer_keys import SignedKey
from pggan_model import PGGAN

PRIVACY_METRICS = (
    "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "total_steps", "budget_epsilon",
)
# The key list's fields (server -> site) and the key reply's field each list is made of (site -> server).
KEY_LIST_FIELDS = {"public-keys": "public-key", "signers": "signer", "signatures": "signature"}
PUBLIC_SITE_FACTS = ("site-id", "num-records", "image-size", "channels", "class-names", "dataset", "is-medical")


def generator_arrays(gan: PGGAN) -> ArrayRecord:
    """G1 and G2 (weights and BatchNorm buffers) as one ArrayRecord."""
    state = {f"g1.{k}": v for k, v in gan.g1.state_dict().items()}
    state.update({f"g2.{k}": v for k, v in gan.g2.state_dict().items()})
    return ArrayRecord(state)


def load_generators(gan: PGGAN, record: ArrayRecord) -> None:
    load_generator_state(gan, record.to_torch_state_dict())


def load_generator_state(gan: PGGAN, state: dict[str, torch.Tensor]) -> None:
    """G1 and G2 from one state dict whose keys are prefixed "g1." / "g2." (as generator_arrays writes them)."""
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


def key_reply(public_key: bytes, signed: SignedKey | None) -> RecordDict:
    """Secure release, step 1 (site): the one-run public key, and its signature when the site signs."""
    reply = {"public-key": public_key}
    if signed is not None:
        reply.update({"signer": signed.signer, "signature": signed.signature})
    return RecordDict({"key": ConfigRecord(reply)})


def key_list_record(replies: list[RecordDict]) -> ConfigRecord:
    """Secure release (server): the sites' key replies as one key list, in the order of ``replies``."""
    return ConfigRecord({name: [bytes(reply["key"].get(field, b"")) for reply in replies]
                         for name, field in KEY_LIST_FIELDS.items()})


def public_keys_of(key_list: ConfigRecord) -> list[bytes]:
    return list(key_list["public-keys"])


def signed_keys_of(key_list: ConfigRecord) -> list[SignedKey]:
    """The key list as the server relayed it; a site that signed nothing appears with empty bytes."""
    publics = public_keys_of(key_list)
    signers, signatures = list(key_list.get("signers", [])), list(key_list.get("signatures", []))
    if not len(signers) == len(signatures) == len(publics):
        raise FedPGGANError("secure release: the server's key list carries no signatures (its fedpggan predates signed "
                            "keys); this site checks peer-keys, so update the coordinator; no share was drawn")
    return [SignedKey(*entry) for entry in zip(publics, signers, signatures)]


def masked_reply(masked: np.ndarray, verified_signers: list[str], share_made_for: int, commitment: bytes) -> RecordDict:
    """Secure release, step 2 (site): the masked share, whose signatures the site checked, the N
    its share was first made for (its least noisy share carries sigma / sqrt(N)), and the hash
    of its self-mask seed."""
    return RecordDict({"masked": ArrayRecord({"sum": torch.from_numpy(masked.view(np.int64))}),
                       "check": ConfigRecord({"verified-signers": verified_signers, "share-made-for": share_made_for,
                                              "seed-commitment": commitment})})


def masked_vector(reply: RecordDict) -> np.ndarray:
    return reply["masked"].to_torch_state_dict()["sum"].numpy().view(np.uint64)


def reveal_reply(seed: bytes) -> RecordDict:
    """Secure release, step 3 (site): the self-mask seed of the attempt whose vectors are all in."""
    return RecordDict({"reveal": ConfigRecord({"self-mask-seed": seed})})


def revealed_seed(reply: RecordDict) -> bytes:
    return bytes(reply["reveal"]["self-mask-seed"])


def _check(reply: RecordDict) -> ConfigRecord | dict:
    """A step-2 reply's "check" record ({} from a site that sent none)."""
    return reply.get("check") or {}


def seed_commitment_of(reply: RecordDict) -> bytes:
    """The hash of the self-mask seed a site committed to with its vector (b"" if it sent none)."""
    return bytes(_check(reply).get("seed-commitment", b""))


def share_made_for(reply: RecordDict) -> int:
    """The N a site's share was first made for (0 if it did not say)."""
    return int(_check(reply).get("share-made-for", 0))


def verified_signers(reply: RecordDict) -> list[str]:
    """The peers whose signed keys a site checked before masking; [] = it took the list on trust."""
    return sorted(_check(reply).get("verified-signers", []))


def destinations(messages: list[Message]) -> dict[str, int]:
    """Message id -> node of each sent message (the grid gives a message its id when it pushes it)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def answering_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply answers for: the destination of the message it replies to. The SuperLink itself answers for a
    node it lost (offline, or the message's time to live ran out) with its own node id as the source."""
    return sent.get(getattr(reply.metadata, "reply_to_message_id", ""), reply.metadata.src_node_id)


def site_error(reply: Message, limit: int = 300) -> str:
    """A failed site's own message: Flower wraps it as ``<class '...'>:<'message'>``, and a
    site's error names its fix, so the wrapper is dropped rather than the fix cut off. In a
    simulation Ray wraps it in tracebacks, where Flower's ClientAppException repeats the site's
    message; failing that, the last ``SomeError: message`` line is the outermost error."""
    reason = reply.error.reason
    match = re.fullmatch(r"<class '[^']+'>:<'(.*)'>", reason, flags=re.DOTALL)
    text = match.group(1) if match else reason
    flower = re.search(r"ClientAppException occurred\. Message: (\S[^\n]*)", text)
    if flower:
        return flower.group(1)[:limit]
    raised = re.findall(r"^[\w.]*(?:Error|Exception): (\S.*)$", text, flags=re.MULTILINE)
    return (raised[-1] if raised and 'File "' in text else text)[:limit]  # only from a traceback
