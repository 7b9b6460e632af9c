"""One federated round at a site, without Flower: budget check, DP-SGD on D, the spend.

Privacy assumptions (see fedpggan.privacy): Poisson sampling, per-sample clipping (by
book-keeping or Opacus) and Gaussian noise, drawn from the site's secret key
(fedpggan.privacy.noise), every step accounted by an Opacus accountant; the noise
multiplier is calibrated once, before the first round, for the whole planned run (rounds x
local steps at this site's sample rate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from client.site import SiteState, journal_used, load_state_file
from fedpggan.build import prior_tensor
from fedpggan.config import RunConfig
from fedpggan.data import ImageDataset
from fedpggan.data.sources import public_name
from fedpggan.errors import FedPGGANError
from fedpggan.privacy import DiscriminatorTrainer, PrivacySettings, default_delta, epsilon_of, extend_history
from fedpggan.privacy.dp_discriminator import sample_rate
from fedpggan.io import atomic_write_bytes
from fedpggan.privacy.mechanism import site_mechanism
from fedpggan.privacy.feature_release import features_for, release_entry, release_sum
from fedpggan.privacy.lifetime import append_progress, append_release_drawn, journal_records_spend, journal_steps
from fedpggan.privacy.noise import SecretNoise, SeededNoise, new_secret_key
from fedpggan.privacy.secure_sum import release_share_noise, top_up_noise
from pggan_model import PGGAN, GeneratorTrainer

# Numerical slack when comparing a projected epsilon with the budget.
BUDGET_TOLERANCE = 1e-6

# Options that do not change what a site computes in a round (where files go, scheduling, the
# coordinator's own device): left out of the round's key, so a moved or rescheduled run keeps it.
# The simulated sites' CPU threads and GPU share stay in: they change the arithmetic's rounding.
NOT_IN_ROUND_KEY = ("dataset", "data_dir", "out", "device", "round_timeout", "sample_every", "checkpoint_every",
                    "keep_checkpoints", "fraction", "min_clients")


@dataclass
class RoundResult:
    status: str  # "trained" or "exhausted"
    privacy: dict[str, float]
    embedding_release: torch.Tensor | None = None
    recovered: bool = False  # recomputed after a crash mid-round, under the spend reserved before it


def ensure_mechanism(state: SiteState, cfg: RunConfig, num_records: int) -> None:
    """Fix this site's DP mechanism on first contact of a DP run: q from its (public) size, sigma
    calibrated for the whole planned run so that the final epsilon meets the budget. Once fixed, a
    message asking for another budget (or for no DP) is refused: the site's caps were checked against the run's epsilon
    and delta, so they must be the ones it keeps spending under."""
    if state.noise_multiplier is not None:
        delta = cfg.delta or default_delta(num_records)
        asked = (cfg.epsilon, delta, cfg.accountant, sample_rate(num_records, cfg.batch_size),
                 cfg.noise_key if state.noise_source else None, cfg.embedding_weight > 0)
        fixed = (state.budget_epsilon, state.delta, state.accountant, state.sample_rate, state.noise_source,
                 state.release_noise is not None)
        if asked != fixed:
            raise FedPGGANError(f"the run now asks for epsilon {cfg.epsilon:g}, delta {delta:g} ({cfg.accountant}), sample "
                                f"rate {asked[3]:.4g}, noise key {cfg.noise_key}, embedding release {'on' if asked[5] else 'off'}, "
                                f"but this site fixed its mechanism for epsilon {state.budget_epsilon:g}, delta {state.delta:g} "
                                f"({state.accountant}), sample rate {state.sample_rate:.4g}, noise key {state.noise_source or 'as saved'}, "
                                f"embedding release {'on' if fixed[5] else 'off'} at first contact (with --delta 0 the delta "
                                "follows the site's image count, so a changed data set also changes it); continue the run with "
                                "its own options (--batch-size, --noise-key, --embedding-weight) and data")
        return
    if not cfg.dp:  # a run without DP keeps no mechanism
        return
    if state.trained_without_dp:  # its earlier replies were not private: no epsilon could state what they spent
        raise FedPGGANError("this site already trained this run without DP; a finite epsilon from now on would not cover "
                            "those rounds: start a new run to train with DP")
    state.budget_epsilon = cfg.epsilon
    state.accountant = cfg.accountant
    state.noise_source = cfg.noise_key  # the DP draws' source is part of the mechanism: a message cannot weaken it later
    state.planned_steps = cfg.rounds * cfg.local_steps
    mechanism = site_mechanism(cfg, num_records, state.planned_steps)
    state.sample_rate, state.delta, state.release_noise = mechanism.sample_rate, mechanism.delta, mechanism.release_noise
    state.noise_multiplier = mechanism.noise_multiplier
    state.save()


def ensure_noise_key(state: SiteState, cfg: RunConfig, site_index: int, journal: str | None = None) -> None:
    """The secret every noise draw of this site derives from, made once per run and kept only
    in the site's state dir. A seed the server knows (``--seed``) would let it regenerate the
    noise and subtract it: so a deployed site refuses ``--noise-key seed`` for a new run. (A run
    it already holds a secret key for, saved before the option existed and resumed, keeps drawing
    as it did then: PyTorch's generator seeded from that key, which the server cannot regenerate.)
    Only a simulation, whose one operator holds every site's data anyway, derives the key from
    ``--seed`` (``FEDPGGAN_SIMULATION=1``), with ``--noise-key seed`` or without DP, so runs are reproducible."""
    simulated = os.environ.get("FEDPGGAN_SIMULATION") == "1"
    if cfg.dp and cfg.noise_key == "seed" and not simulated and not state.noise_key:
        raise FedPGGANError("the run asks for --noise-key seed, which lets whoever knows --seed regenerate this site's DP "
                            "noise; a deployed site refuses it: run with --run-config \"noise-key='secret'\"")
    if state.noise_key:
        return
    if journal is not None and journal_records_spend(journal, state.run_id):
        # the run's state was lost, or restored from a backup older than the run: starting it over would draw a
        # second release and restart its accountant below what the run has spent
        raise FedPGGANError(f"{state.path}: this run's site state is missing or older than the run, but spend-journal "
                            f"{journal} records its spend; restore {state.path.parent} from a backup (never start a run's "
                            "state afresh)", shared="this site's state of the run is lost; the site's log says what to restore")
    seeded = simulated and (cfg.noise_key == "seed" or not cfg.dp)
    state.noise_key = f"simulation/{cfg.seed}/{site_index}" if seeded else new_secret_key().hex()
    state.save()


def noise_seed(state: SiteState, *parts: object) -> int:
    """A 63-bit seed from the site's key and ``parts`` (e.g. round and inputs), for PyTorch's
    generator: the fakes' latents, and the DP draws of a run with ``--noise-key seed``."""
    digest = hashlib.sha256("/".join(map(str, (state.noise_key, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def secret_noise(state: SiteState, cfg: RunConfig, *parts: object) -> SecretNoise | None:
    """The cryptographic stream of one draw (e.g. a round or the release) under the site's secret
    key; None when the run's DP draws come from PyTorch's seeded generator (``--noise-key seed``)."""
    if not cfg.dp or cfg.noise_key == "seed":
        return None
    if state.noise_key.startswith("simulation/"):
        raise FedPGGANError(f"{state.path}: this site's key was derived from --seed (a run with --noise-key seed or "
                            "without DP); resume the run with its own settings (--noise-key seed) or start a new run")
    return SecretNoise(bytes.fromhex(state.noise_key), "/".join(map(str, parts)))


def charge_release(state: SiteState, cfg: RunConfig) -> None:
    """Put the release's spend first in the site's history (once): privacy first, before the data
    are read, and also at a site that never made its share of a secure release (over-counting is safe)."""
    if cfg.dp and cfg.embedding_weight > 0 and as_floats(state.history[:1]) != as_floats([release_entry(state.release_noise)]):
        state.history = [list(release_entry(state.release_noise)), *state.history]
        state.save()


def ensure_release(state: SiteState, cfg: RunConfig, data: ImageDataset, share_of: int = 0,
                   journal: str | None = None) -> torch.Tensor | None:
    """The site's one-shot class-mean-embedding release (made on first use, then reused): the
    whole release, or with ``share_of`` = N its share of a secure sum over N sites, which carries
    1/sqrt(N) of the noise (fedpggan.privacy.secure_sum). A share never leaves the site unmasked.
    A share made for more sites than a retried sum has left is topped up with fresh noise."""
    if cfg.embedding_weight <= 0:
        return None
    made_for = state.release_share_of
    if made_for and not share_of:
        raise FedPGGANError(f"this site's embedding release was made as a share of a secure sum over {made_for} sites and "
                            "cannot be sent plain: its noise would not cover it; start a new run")
    if state.release_file.exists():
        released = load_state_file(state.release_file)
    else:
        inputs = release_key(cfg, data, made_for or share_of)
        charged = state.release_noise is not None and as_floats(state.history[:1]) == as_floats([release_entry(state.release_noise)])
        if state.release_key != inputs and (state.release_key or charged):
            raise FedPGGANError(f"{state.release_file}: missing, and this site cannot show that a new draw would be the "
                                "release it was charged for (its data, release options or plain/secure mode changed, or "
                                "its state predates that record): a second release would go uncounted; restore the file "
                                "from backup or start a new run")
        state.release_key = inputs  # saved with the charge: a crash and retry redraws this very release
        charge_release(state, cfg)
        if not cfg.dp:  # the data are read without DP: the lifetime caps count this run as (inf, 1) from now on
            state.trained_without_dp = True
        if share_of and not made_for:  # fixed before the noise is drawn: a crash and retry redraws this share
            state.release_share_of = made_for = share_of
        state.save()
        if cfg.dp and journal is not None:  # on another volume: a lost state cannot forget that this release exists
            append_release_drawn(journal, state.run_id)
            journal_used(state).touch()
        # Already charged but no file means a crash in between: the same seed redraws the same noise
        # on the same inputs (release_key), hence the same release.
        noise = secret_noise(state, cfg, "release") or SeededNoise(noise_seed(state, "release"))
        features = features_for(data.image_shape, cfg.embedding_frequencies, cfg.seed, cfg.embedding_blur)
        sigma = (release_share_noise(state.release_noise, made_for) if made_for else state.release_noise) if cfg.dp else None
        released = release_sum(features, data.images, data.labels, data.num_classes, cfg.embedding_count_share, sigma, noise)
        buffer = io.BytesIO()
        torch.save(released, buffer)
        atomic_write_bytes(state.release_file, buffer.getvalue())
    if cfg.dp and made_for and share_of < made_for:  # the sum was restarted without some sites
        parts = ("release-top-up", made_for, share_of)  # the same top-up each time: a replay sends the same vector
        noise = secret_noise(state, cfg, *parts) or SeededNoise(noise_seed(state, *parts))
        released = released + top_up_noise(state.release_noise, made_for, share_of) * noise.normal(released.shape, released.dtype)
    return released


def release_key(cfg: RunConfig, data: ImageDataset, share_of: int) -> str:
    """What the release is a function of besides its noise: the data, the release's options and
    its mode (0: plain; N: a share of a secure sum over N sites, with 1/sqrt(N) of the noise --
    the same draw at another scale would let the noise be solved for)."""
    options = [cfg.embedding_frequencies, cfg.seed, cfg.embedding_blur, cfg.embedding_count_share, share_of, data.sha256]
    return hashlib.sha256(json.dumps(options).encode()).hexdigest()


def spend(state: SiteState, steps: int, epsilon: float | None = None) -> dict[str, float]:
    """The spend a site reports; ``epsilon`` may be passed when already computed for this history."""
    if epsilon is None:
        epsilon = epsilon_of([tuple(h) for h in state.history], state.delta, state.accountant, check_grid=False)  # within the plan
    return {
        "epsilon": epsilon, "delta": state.delta, "noise_multiplier": state.noise_multiplier,
        "sample_rate": state.sample_rate, "steps": steps, "budget_epsilon": state.budget_epsilon,
        "total_steps": sum(int(h[2]) for h in state.history),
    }


def round_key(weights_sha: str, cfg: RunConfig, data: ImageDataset) -> str:
    """Everything a round's output is a function of besides its noise: the weights the server
    sent (``weights_sha``), the run's options and the site's data. The round's DP draws are
    keyed to it, so the same inputs give the same output (a recomputation, which reveals
    nothing new) and any other input gets a draw of its own: a server that re-asks a round with
    other options, or a site whose data changed, never gets two outputs sharing one noise draw."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_ROUND_KEY}
    text = json.dumps([weights_sha, options, data.sha256], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def count_journal_steps(state: SiteState, journal: str) -> None:
    """Steps the spend journal records for this run beyond the state's own were spent: the state
    was restored from a copy older than the journal (or a crash fell between their two writes).
    They count again, privacy first, and the site's reported total tells the server."""
    behind = journal_steps(journal, state.run_id) - sum(int(h[2]) for h in state.history)
    if behind > 0:
        print(f"warning: {state.path} records {behind} DP steps of run {state.run_id} fewer than spend-journal "
              f"{journal}: it is older than the journal (restored from a backup?); those steps count as spent",
              file=sys.stderr)
        state.history = [list(h) for h in extend_history([tuple(h) for h in state.history], state.noise_multiplier,
                                                         state.sample_rate, behind)]
        state.save()


def run_site_round(gan: PGGAN, data: ImageDataset, cfg: RunConfig, state: SiteState, round_num: int,
                   site_index: int, key: str | None = None, journal: str | None = None) -> RoundResult:
    """Train ``gan.d`` (and, with local generator training, G1/G2) for one round in place.

    ``key`` is the round's :func:`round_key` (the weights the server sent, the options, the data;
    that of unnamed weights when None); the round's noise is seeded by the site's secret key, the
    round and that key. A
    round reserved with the same key but never finished (the site died mid-round), and still the
    site's latest spend, is recomputed with the same seed, hence the same noise: it yields the
    one output that reservation paid for, so it is not charged again. Otherwise the reserved
    spend stays spent (privacy first) and the round is charged anew; other inputs give other
    noise, so no two outputs share a draw."""
    ensure_noise_key(state, cfg, site_index, journal)
    key = round_key("", cfg, data) if key is None else key
    torch.manual_seed(noise_seed(state, "round", round_num, key))
    privacy = None
    ensure_mechanism(state, cfg, len(data))  # also refuses a DP run's switch to no DP
    # A secure run's share was made (and charged) at the secure release and never rides on a round reply.
    release = ensure_release(state, cfg, data, journal=journal) if cfg.release_aggregation == "plain" else None
    charge_release(state, cfg)
    if cfg.dp and journal is not None:
        count_journal_steps(state, journal)
    reserved = state.rounds.get(str(round_num), {})
    recovering = bool(cfg.dp and reserved.get("status") == "reserved" and reserved.get("input_sha") == key
                      and as_floats(state.history) == as_floats(extend_history(
                          reserved["history_before"], state.noise_multiplier, state.sample_rate, cfg.local_steps)))
    previous = [tuple(h) for h in (reserved["history_before"] if recovering else state.history)]
    if cfg.dp:
        if state.exhausted:  # a refusal carries nothing computed from the data
            return RoundResult("exhausted", spend(state, 0))
        planned = extend_history(previous, state.noise_multiplier, state.sample_rate, cfg.local_steps)
        planned_epsilon = epsilon_of(planned, state.delta, state.accountant)
        if not recovering:
            if planned_epsilon > state.budget_epsilon + BUDGET_TOLERANCE:
                state.exhausted = True
                state.save()
                return RoundResult("exhausted", spend(state, 0))
            # Privacy first: record the spend before touching the data. The cached reply of an earlier
            # answer goes first: it could no longer be replayed, and beside a round reserved anew it
            # would make this state look older than its files (SiteState.check_not_behind).
            state.reply_cache.unlink(missing_ok=True)
            if journal is not None:  # on another volume: a state restored from an older copy cannot forget this round
                append_progress(journal, state.run_id, sum(int(h[2]) for h in planned))
                journal_used(state).touch()
            state.rounds[str(round_num)] = {"status": "reserved", "steps": cfg.local_steps, "input_sha": key,
                                            "history_before": [list(h) for h in previous]}
            state.history = [list(h) for h in planned]
            state.save()
        privacy = PrivacySettings(state.noise_multiplier, cfg.max_grad_norm, state.delta, state.accountant,
                                  cfg.grad_sample_mode, cfg.fake_gradients)
    elif not state.trained_without_dp:  # recorded before the data is touched: the lifetime caps count it as (inf, 1)
        state.trained_without_dp = True
        state.save()
    prior = prior_tensor(cfg, data.num_classes)
    trainer = DiscriminatorTrainer(gan, data.images, data.labels, cfg.batch_size, privacy, previous, prior,
                                   secret_noise(state, cfg, "round", round_num, key))
    trainer.train(cfg.local_steps)
    if privacy is not None and as_floats(trainer.history) != as_floats(state.history):
        raise FedPGGANError(f"site accountant mismatch: the trainer recorded {trainer.history}, the site reserved {state.history}")
    if cfg.generator_training == "local":  # the generators' weights go back in the reply, their losses stay here
        g_trainer = GeneratorTrainer(gan)
        for _ in range(cfg.g_steps):  # as the server resolved --g-steps 0
            g_trainer.step(cfg.g_batch_size, prior)
    if privacy is None:
        return RoundResult("trained", {"epsilon": math.inf, "steps": cfg.local_steps}, release)
    state.rounds[str(round_num)].update(status="done", recovered=bool(recovering))
    state.save()
    return RoundResult("trained", spend(state, cfg.local_steps, planned_epsilon), release, bool(recovering))


def as_floats(history: list) -> list[tuple[float, ...]]:
    return [tuple(map(float, h)) for h in history]


def public_facts(site_id: str, data: ImageDataset) -> dict[str, Any]:
    """What a site tells the server about itself: shape and class names, its size (public) and
    its dataset's public name (never its path)."""
    return {
        "site-id": site_id, "num-records": len(data), "image-size": data.image_size, "channels": data.channels,
        "class-names": list(data.class_names), "dataset": public_name(data.name), "is-medical": data.is_medical,
    }
