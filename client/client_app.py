"""The fedpggan ClientApp: one hospital site.

``query``: reply with the site's public facts (size, image shape, class names).
``train``: DP-SGD on the discriminator with the site's own images (client/site_round.py),
reply with D's weights and the privacy spend. ``release_keys``, ``release_masked`` and
``release_reveal``: the three steps of the secure release (fedpggan.privacy.secure_sum).
Nothing else leaves the site; a failure's text does, without the site's paths (``site_handler``).

A round that was trained but whose reply was lost (the server died) is replayed from the
site's cache when the server asks for it again with the same inputs: the same output is
released again, so the spend is not charged twice.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import time
import warnings
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.site import (DAMAGED_CACHE, SiteState, check_collusion_cap, check_lifetime_budget, check_node_config_keys,
                         check_site_budget, load_site_data, load_state_file, peer_signing, shared_error, site_device,
                         site_identity, site_lock, spend_journal, state_dir)
from client.site_round import (ensure_mechanism, ensure_noise_key, ensure_release, public_facts, round_key,
                               run_site_round)
from fedpggan.build import build_gan
from fedpggan.config import RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_bytes
from fedpggan.privacy.peer_keys import sign_key, verify_key_list
from fedpggan.privacy.secure_sum import (check_key_list, masked_share, new_key_pair, new_self_mask_seed, private_key_bytes, private_key_from,
                                         public_key_of, seed_commitment)
from fedpggan.wire import (arrays_sha256, generator_arrays, key_reply, load_generators, masked_reply, public_keys_of,
                          reply_content, reveal_reply, signed_keys_of)

# Keys the server adds to the run options in a message's "config" record.
ROUND_KEYS = ("round", "run-id", "site-state-root")

app = ClientApp()
warnings.filterwarnings("ignore", module="opacus")


def site_handler(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A handler whose failures reach the coordinator without the site's paths or other studies
    (client.site.shared_error); the full error stays in the SuperNode's log, as the cause."""
    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        try:
            check_node_config_keys(context.node_config)
            return handler(msg, context)
        except Exception as exc:
            raise FedPGGANError(shared_error(exc, context.node_config)) from exc
    return handle


def run_config_of(msg: Message) -> tuple[RunConfig, dict]:
    """The run's options as the coordinator sent them. An option it does not send holds the value
    of the day before the option existed (RunConfig.from_saved): a site newer than its
    coordinator then encodes its release the way that coordinator decodes it."""
    raw = dict(msg.content["config"])
    cfg = RunConfig.from_saved({k: v for k, v in raw.items() if k not in ROUND_KEYS})
    return cfg, raw


def site_index(node_config: dict) -> int:
    """The simulation's partition id, else a number derived from the site id (seeds only)."""
    site_id = site_identity(node_config)
    return int(node_config.get("partition-id", int(hashlib.sha256(site_id.encode()).hexdigest()[:8], 16)))


@app.query()
@site_handler
def query(msg: Message, context: Context) -> Message:
    cfg, _ = run_config_of(msg)
    data = load_site_data(context.node_config, cfg)
    check_site_budget(context.node_config, cfg, len(data))
    facts = public_facts(site_identity(context.node_config), data)
    return Message(RecordDict({"site": ConfigRecord(facts)}), reply_to=msg)


@app.query("release_keys")
@site_handler
def release_keys(msg: Message, context: Context) -> Message:
    """Secure release, step 1: a fresh key pair; the public key leaves, the private one stays. A
    site with a roster (``peer-keys``) signs it for this run with its SuperNode key."""
    cfg, raw = run_config_of(msg)
    root, run_id = state_dir(context.node_config, raw), str(raw["run-id"])
    signing = peer_signing(context.node_config)
    with site_lock(root, run_id):
        state = SiteState.load(root, run_id)
        private, public = new_key_pair()
        atomic_write_bytes(state.secure_key_file, private_key_bytes(private))
    signed = sign_key(signing.signing_key, run_id, public) if signing is not None else None
    return Message(key_reply(public, signed), reply_to=msg)


@app.query("release_masked")
@site_handler
def release_masked(msg: Message, context: Context) -> Message:
    """Secure release, step 2: this site's share of the release (1/sqrt(N) of the noise), masked
    towards every other key of the list and self-masked; only the sum of all N vectors, with every
    site's self-mask seed (step 3), reveals anything. A site
    with a roster first checks that every key is signed, for this run, by a distinct peer. When
    the server restarts the sum without a failed site, the share is topped up for the smaller N."""
    cfg, raw = run_config_of(msg)
    root, run_id = state_dir(context.node_config, raw), str(raw["run-id"])
    keys = msg.content["keys"]
    publics = public_keys_of(keys)
    signing = peer_signing(context.node_config)
    signers = verify_key_list(signed_keys_of(keys), signing.roster, run_id) if signing is not None else []
    with site_lock(root, run_id):
        state = SiteState.load(root, run_id)
        if not state.secure_key_file.exists():
            raise FedPGGANError("secure release: this site holds no key of this protocol run; the server must restart it from step 1")
        if state.revealed_file.exists():
            raise FedPGGANError("secure release: this site already revealed its self-mask for another attempt of this run, "
                                "so it takes part in no other; start a new run")
        try:
            private = private_key_from(state.secure_key_file.read_bytes())
        except ValueError as exc:  # a truncated or overwritten key file
            raise FedPGGANError(f"{state.secure_key_file}: not an X25519 key ({exc}): this site cannot take part in this "
                                "attempt of the run's secure release; the server restarts it without this site, or start "
                                "a new run") from exc
        check_key_list(public_key_of(private), publics)  # before anything is charged
        data = load_site_data(context.node_config, cfg)
        check_site_budget(context.node_config, cfg, len(data))
        journal = spend_journal(context.node_config, state)
        ensure_noise_key(state, cfg, site_index(context.node_config), journal)
        ensure_mechanism(state, cfg, len(data))
        if cfg.dp:
            # the least noisy share this site sends, made for the first key list, bounds its worst case
            check_collusion_cap(context.node_config, state, state.release_share_of or len(publics))
        check_lifetime_budget(context.node_config, state, cfg)  # last: a run refused above reserves nothing
        share = ensure_release(state, cfg, data, share_of=len(publics), journal=journal)
        seed = new_self_mask_seed()
        masked = masked_share(share, private, public_key_of(private), publics, seed)
        atomic_write_bytes(state.self_mask_file, public_key_of(private) + seed)
        state.release_signers = signers
        state.save()
        state.secure_key_file.unlink()  # one protocol run, one key: a replayed key list gets no second vector
    return Message(masked_reply(masked, signers, state.release_share_of, seed_commitment(seed)), reply_to=msg)


@app.query("release_reveal")
@site_handler
def release_reveal(msg: Message, context: Context) -> Message:
    """Secure release, step 3: the self-mask seed of this site's latest vector, once the server
    has every vector of that attempt. Revealed for one attempt only, so this site's share is in
    at most one sum the server can unmask, whatever it claims about failed sites."""
    _, raw = run_config_of(msg)
    root, run_id = state_dir(context.node_config, raw), str(raw["run-id"])
    publics = public_keys_of(msg.content["keys"])
    with site_lock(root, run_id):
        state = SiteState.load(root, run_id)
        if not state.self_mask_file.exists():
            raise FedPGGANError("secure release: this site sent no masked vector in this run; the server must restart from step 1")
        mask = state.self_mask_file.read_bytes()
        own, seed = mask[:32], mask[32:]
        if own not in publics:
            raise FedPGGANError("secure release: the server asked for the self-mask of an attempt this site sent no vector in")
        if state.revealed_file.exists() and state.revealed_file.read_bytes() != own:
            raise FedPGGANError("secure release: this site already revealed its self-mask for another attempt of this run; "
                                "start a new run")
        atomic_write_bytes(state.revealed_file, own)  # before the seed leaves: a crash cannot let a second seed out
    return Message(reveal_reply(seed), reply_to=msg)


@app.train()
@site_handler
def train(msg: Message, context: Context) -> Message:
    cfg, raw = run_config_of(msg)
    if "partition-id" in context.node_config:  # a simulated site gets --client-cpus; a deployed one keeps its cores
        torch.set_num_threads(max(1, int(cfg.client_cpus)))
    round_num, run_id = int(raw["round"]), str(raw["run-id"])
    root = state_dir(context.node_config, raw)
    with site_lock(root, run_id):  # a stale ClientApp of a crashed run must not overwrite newer state
        return Message(train_round(msg, context, cfg, SiteState.load(root, run_id), round_num), reply_to=msg)


def train_round(msg: Message, context: Context, cfg: RunConfig, state: SiteState, round_num: int) -> RecordDict:
    """The reply to one train message: replayed from the cache, or trained now."""
    site_id = site_identity(context.node_config)
    started = time.perf_counter()
    data = load_site_data(context.node_config, cfg)
    device = site_device(context.node_config, cfg)
    # the device too: a GPU rounds otherwise than a CPU, and two outputs must never share a draw
    input_sha = f"{arrays_sha256(msg.content['d'], msg.content['g'])}@{device.type}"
    key = round_key(input_sha, cfg, data)
    cached = replay(state, round_num, key)  # only for the same weights, options, data and device
    if cached is not None:
        return cached

    check_site_budget(context.node_config, cfg, len(data))
    journal = spend_journal(context.node_config, state)
    ensure_noise_key(state, cfg, site_index(context.node_config), journal)  # a run these refuse reserves nothing ...
    ensure_mechanism(state, cfg, len(data))  # also refuses a DP run's switch to no DP
    check_lifetime_budget(context.node_config, state, cfg)  # ... against the lifetime cap, checked before any charge
    gan = build_gan(cfg, data.image_size, data.channels, data.num_classes).to(device)
    gan.d.load_state_dict(msg.content["d"].to_torch_state_dict())
    load_generators(gan, msg.content["g"])
    result = run_site_round(gan, data, cfg, state, round_num, site_index(context.node_config), key, journal)
    status = {"status": result.status, "site-id": site_id, "replayed": False,
              "recovered": result.recovered,
              "t-compute": time.perf_counter() - started}  # data loading + training: the rest of a round is Flower
    g_record = generator_arrays(gan) if cfg.generator_training == "local" and result.status == "trained" else None
    privacy = {k: v for k, v in result.privacy.items() if v is not None and not (isinstance(v, float) and math.isinf(v))}
    content = reply_content(gan.d.state_dict(), privacy, status, g_record, result.embedding_release)
    if cfg.dp and result.status == "trained":
        remember(state, round_num, key, content)
    return content


def remember(state: SiteState, round_num: int, key: str, content: RecordDict) -> None:
    """Keep the last reply so a lost reply can be re-sent without training (and spending) again."""
    buffer = io.BytesIO()
    torch.save({
        "round": round_num, "input_sha": key,
        "d": content["d"].to_torch_state_dict(),
        "g": content["g"].to_torch_state_dict() if "g" in content else None,
        "privacy": dict(content["privacy"]), "status": dict(content["status"]),
    }, buffer)
    atomic_write_bytes(state.reply_cache, buffer.getvalue())


def replay(state: SiteState, round_num: int, key: str) -> RecordDict | None:
    """The cached reply of ``round_num`` if it was computed from exactly these inputs (``key``:
    client.site_round.round_key)."""
    cached = state.cached_reply()  # tensors and plain values only
    if cached is None or cached["round"] != round_num or cached["input_sha"] != key:
        return None
    if not {"d", "g", "privacy", "status"} <= cached.keys():
        raise FedPGGANError(f"{state.reply_cache}: holds no whole reply to re-send; {DAMAGED_CACHE}")
    status = {**cached["status"], "replayed": True, "recovered": False}
    g_record = ArrayRecord(cached["g"]) if cached["g"] is not None else None
    plain = state.release_file.exists() and not state.release_share_of  # a secure share never leaves unmasked
    release = load_state_file(state.release_file) if plain else None
    return reply_content(cached["d"], cached["privacy"], status, g_record, release)
