"""Where DP noise comes from: the secret AES-CTR stream by default, PyTorch's seeded generator on request."""

from __future__ import annotations

import json
import math

import pytest
import torch

from client.site import SiteState
from client.site_round import ensure_noise_key, run_site_round
from fedpggan.audit.runner import audit_run
from fedpggan.data import open_dataset
from fedpggan.errors import FedPGGANError
from fedpggan.privacy import DiscriminatorTrainer, PrivacySettings
from fedpggan.privacy.noise import SEEDED_NOISE, SecretNoise
from fedpggan.train import train_centralised
from pggan_model import PGGAN, ModelShape

from conftest import tiny_config

SHAPE = ModelShape(image_size=28, channels=1, num_classes=2, latent_dim=16, g_width=16, d_width=8)
KEY = bytes(range(32))


def test_secret_stream_is_keyed_and_standard_normal():
    same = SecretNoise(KEY, "round/1").normal((8,)), SecretNoise(KEY, "round/1").normal((8,))
    assert torch.equal(*same)  # a crashed site redraws the one output it paid for
    assert not torch.equal(same[0], SecretNoise(KEY, "round/2").normal((8,)))
    assert not torch.equal(same[0], SecretNoise(bytes(32), "round/1").normal((8,)))
    draws = SecretNoise(KEY, "moments").normal((400_000,), torch.float64)
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
    assert abs((draws**4).mean() - 3) < 0.05  # Gaussian tails, not just the right variance
    u = SecretNoise(KEY, "uniform").uniform(100_000)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    with pytest.raises(ValueError, match="32 secret bytes"):
        SecretNoise(b"short", "x")


def test_poisson_indices_sample_each_record_at_the_rate():
    noise = SecretNoise(KEY, "poisson")
    sizes = [len(noise.poisson_indices(1000, 0.05)) for _ in range(200)]
    assert abs(sum(sizes) / len(sizes) - 50) < 2.5 and len(set(sizes)) > 5  # Poisson sizes vary


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_the_optimizer_adds_noise_of_std_sigma_c_from_the_stream(mode):
    data = open_dataset("phantom", image_size=28).subset(range(64))
    sigma, clip = 2.0, 0.5
    trainer = DiscriminatorTrainer(PGGAN(SHAPE), data.images, data.labels, 16, PrivacySettings(sigma, clip, 1e-5, "prv", mode),
                                   noise=SecretNoise(KEY, "std"))
    params = trainer.optimizer.params
    for p in params:
        p.summed_grad = torch.zeros_like(p)
    torch.manual_seed(0)
    trainer.optimizer.add_noise()
    added = torch.cat([p.grad.flatten() for p in params])
    assert added.std().item() == pytest.approx(sigma * clip, rel=0.03)
    first = added.clone()
    for p in params:
        p.summed_grad = torch.zeros_like(p)
    torch.manual_seed(0)  # PyTorch's generator does not drive the draws: the next ones differ
    trainer.optimizer.add_noise()
    assert not torch.equal(first, torch.cat([p.grad.flatten() for p in params]))
    # the draws come from the key's stream: a second trainer on the same key redraws them, one on another key does not
    for key, same in ((KEY, True), (bytes(32), False)):
        again = DiscriminatorTrainer(PGGAN(SHAPE), data.images, data.labels, 16, PrivacySettings(sigma, clip, 1e-5, "prv", mode),
                                     noise=SecretNoise(key, "std"))
        for p in again.optimizer.params:
            p.summed_grad = torch.zeros_like(p)
        again.optimizer.add_noise()
        assert torch.equal(first, torch.cat([p.grad.flatten() for p in again.optimizer.params])) == same


def test_secret_noise_trains_and_accounts_like_opacus_own_draws():
    data = open_dataset("phantom", image_size=28).subset(range(128))
    privacy = PrivacySettings(1.0, 1.0, 1e-5, "prv")
    weights = []
    for key in (KEY, KEY, bytes(32)):
        torch.manual_seed(0)
        gan = PGGAN(SHAPE)
        trainer = DiscriminatorTrainer(gan, data.images, data.labels, 32, privacy, noise=SecretNoise(key, "train"))
        trainer.train(3)
        assert trainer.history == [(1.0, 0.25, 3)] and math.isfinite(trainer.epsilon())
        weights.append(gan.d.head.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_a_deployed_site_refuses_seeded_noise_and_a_simulation_makes_secret_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPGGAN_SIMULATION", raising=False)
    seeded = tiny_config(tmp_path / "run", epsilon=5.0, noise_key="seed")
    with pytest.raises(FedPGGANError, match="noise-key='secret'"):
        ensure_noise_key(SiteState.load(tmp_path / "deployed", "run"), seeded, 0)
    resumed = SiteState.load(tmp_path / "deployed_before", "run")  # a run saved before --noise-key, resumed
    resumed.noise_key = "5e" * 32
    ensure_noise_key(resumed, seeded, 0)  # its draws still derive from its own secret key
    assert resumed.noise_key == "5e" * 32
    monkeypatch.setenv("FEDPGGAN_SIMULATION", "1")
    keys = []
    for name in ("sim", "sim_again"):  # the same run, site and --seed: a secret key differs every time
        simulated = SiteState.load(tmp_path / name, "run")
        ensure_noise_key(simulated, tiny_config(tmp_path / "run", epsilon=5.0), 0)
        keys.append(simulated.noise_key)
    assert all(len(bytes.fromhex(k)) == 32 for k in keys) and keys[0] != keys[1]  # secret, not derived from --seed
    reproducible = SiteState.load(tmp_path / "sim_seed", "run")
    ensure_noise_key(reproducible, seeded, 0)
    assert reproducible.noise_key == "simulation/0/0"


def test_a_seeded_site_state_is_not_resumed_with_secret_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPGGAN_SIMULATION", "1")
    data = open_dataset("phantom", image_size=28).subset(range(200))
    state = SiteState.load(tmp_path / "state", "run")
    seeded = tiny_config(tmp_path / "run", epsilon=5.0, local_steps=1, noise_key="seed")
    assert run_site_round(PGGAN(SHAPE), data, seeded, state, 1, 0).status == "trained"
    with pytest.raises(FedPGGANError, match="noise key secret, .* fixed its mechanism .* noise key seed"):
        run_site_round(PGGAN(SHAPE), data, tiny_config(tmp_path / "run", epsilon=5.0, local_steps=1), state, 2, 0)


@pytest.mark.parametrize("change, words", [
    ({"noise_key": "seed"}, "noise key seed"),  # would swap the AES stream for PyTorch's generator mid-run
    ({"batch_size": 64}, "sample rate 0.25, "),  # the site would sample at another rate than it reserved
    ({"embedding_weight": 50.0}, "embedding release on"),  # a release the mechanism has no noise for
])
def test_a_message_cannot_change_a_sites_mechanism_mid_run(tmp_path, monkeypatch, change, words):
    """What the site's spend is computed from is fixed at first contact; a later message asking for
    another noise source, sampling rate or a release is refused before the data are read."""
    monkeypatch.setenv("FEDPGGAN_SIMULATION", "1")
    data = open_dataset("phantom", image_size=28).subset(range(200))
    state = SiteState.load(tmp_path / "state", "run")
    first = dict(epsilon=5.0, local_steps=1, embedding_weight=0.0)
    assert run_site_round(PGGAN(SHAPE), data, tiny_config(tmp_path / "run", **first), state, 1, 0).status == "trained"
    history = [list(h) for h in state.history]
    with pytest.raises(FedPGGANError, match=words) as excinfo:
        run_site_round(PGGAN(SHAPE), data, tiny_config(tmp_path / "run", **{**first, **change}), state, 2, 0)
    assert "continue the run with its own options" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert state.history == history  # nothing reserved


def test_centralised_runs_are_reproducible_only_with_seeded_noise_and_its_audit_fails(tmp_path):
    def d_weights(out, noise_key):
        folder = train_centralised(tiny_config(tmp_path / out, epsilon=5.0, noise_key=noise_key))
        state = torch.load(sorted((folder / "checkpoints").glob("*.pt"))[-1], weights_only=False)["state_dict"]
        return folder, state["d.head.weight"]

    secret_a, w_secret_a = d_weights("secret_a", "secret")
    _, w_secret_b = d_weights("secret_b", "secret")
    seed_a, w_seed_a = d_weights("seed_a", "seed")
    _, w_seed_b = d_weights("seed_b", "seed")
    assert torch.equal(w_seed_a, w_seed_b) and not torch.equal(w_secret_a, w_secret_b)
    ledger = json.loads((seed_a / "privacy_ledger.json").read_text())
    assert ledger["noise_key"] == "seed" and any(SEEDED_NOISE in a for a in ledger["assumptions"])
    failed = audit_run(seed_a)
    assert not failed["passed"] and [v["field"] for v in failed["violations"]] == ["config.noise-key"]
    assert audit_run(secret_a)["passed"]
