"""DP-SGD on the discriminator: per-sample gradients, accounting, budgets, persistence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from client.site import SiteState
from client.site_round import run_site_round
from fedpggan.data import open_dataset
from fedpggan.errors import FedPGGANError
from fedpggan.privacy import DiscriminatorTrainer, PrivacySettings, calibrate_noise, epsilon_of, extend_history
from fedpggan.privacy.dp_discriminator import sample_rate, strip_opacus_prefix
from fedpggan.privacy.noise import SeededNoise
from pggan_model import PGGAN, ModelShape, discriminator_loss

from conftest import tiny_config

SHAPE = ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_equal_per_example_autograd(mode):
    torch.manual_seed(0)
    gan = PGGAN(SHAPE)
    x, y = torch.randn(5, 1, 28, 28), torch.tensor([0, 1, 1, 0, 1])
    gsm = GradSampleModule(gan.d, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    logits = gsm(x, y)
    discriminator_loss(logits, num_real=2).mul(len(x)).backward()  # sum reduction
    for i in range(len(x)):
        ref = PGGAN(SHAPE)
        ref.d.load_state_dict(strip_opacus_prefix(gsm.state_dict()))
        loss = discriminator_loss(ref.d(x[i : i + 1], y[i : i + 1]), num_real=1 if i < 2 else 0)
        grads = torch.autograd.grad(loss, list(ref.d.parameters()))
        for p, g in zip(gsm._module.parameters(), grads):
            # float32 rounding differs between CPUs: compare to the gradient's own scale
            assert (p.grad_sample[i] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7, "per-sample gradient differs"
    gsm._close()


def test_dp_training_reports_epsilon_within_target():
    torch.manual_seed(0)
    data = open_dataset("phantom", image_size=28).subset(range(256))
    gan = PGGAN(SHAPE)
    q = sample_rate(len(data), 32)
    sigma = calibrate_noise(3.0, 1e-5, q, 20, "prv")
    trainer = DiscriminatorTrainer(gan, data.images, data.labels, 32, PrivacySettings(sigma, 1.0, 1e-5, "prv"))
    before = {k: v.clone() for k, v in gan.d.state_dict().items()}
    trainer.train(20)
    assert trainer.history == [(sigma, q, 20)]
    eps = trainer.epsilon()
    assert 2.5 < eps <= 3.0 + 1e-6
    assert epsilon_of(trainer.history, 1e-5, "rdp") >= eps * 0.95  # RDP is a looser bound
    assert any(not torch.equal(before[k], v) for k, v in gan.d.state_dict().items())


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_every_clipping_mode_samples_and_accounts_the_planned_rate(mode):
    """Opacus takes q as 1 / len(its Poisson loader), which float rounding makes one batch short when
    ceil(n / B) is 93, 99, 105, ...: 5900 records in batches of 64 would be accounted at 1/92, not the
    1/93 the site calibrated its noise for and reserved (its accountant check would then fail every round)."""
    torch.manual_seed(0)
    images, labels = torch.randn(5900, 1, 28, 28), torch.randint(0, 2, (5900,))
    trainer = DiscriminatorTrainer(PGGAN(SHAPE), images, labels, 64, PrivacySettings(1.0, 1.0, 1e-5, "rdp", mode))
    trainer.train(1)
    assert trainer.history == [(1.0, sample_rate(5900, 64), 1)] and sample_rate(5900, 64) == 1 / 93
    assert trainer.expected_batch_size == int(5900 / 93) == 63
    if mode != "bookkeeping":  # the noisy sum Opacus divides by B
        assert trainer.optimizer.expected_batch_size == 63


def test_ghost_clipping_mode_trains():
    torch.manual_seed(0)
    data = open_dataset("phantom", image_size=28).subset(range(128))
    gan = PGGAN(SHAPE)
    trainer = DiscriminatorTrainer(gan, data.images, data.labels, 32, PrivacySettings(1.0, 1.0, 1e-5, "prv", "ghost"))
    stats = trainer.train(3)
    assert len(stats) == 3 and all(math.isfinite(s["d_loss"]) for s in stats)
    assert trainer.history[0][2] == 3


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("n_real", [3, 0])
def test_exact_fakes_step_equals_clipped_reals_plus_plain_fakes(mode, n_real):
    """The faster path's update, checked against per-example autograd: sum of real gradients
    clipped to C, plus the fakes' unclipped gradients, all over the expected batch size B."""
    torch.manual_seed(0)
    data = open_dataset("phantom", image_size=28).subset(range(64))
    gan = PGGAN(SHAPE)
    clip = 0.05  # small enough that every real gradient is clipped
    trainer = DiscriminatorTrainer(gan, data.images, data.labels, 8,
                                   PrivacySettings(0.0, clip, 1e-5, "prv", mode, fake_gradients="exact"))
    real, real_labels = data.images[:n_real], data.labels[:n_real]
    fake, fake_labels = gan.fake_batch(4)
    ref = PGGAN(SHAPE).d
    ref.load_state_dict(strip_opacus_prefix(trainer.model.state_dict()))
    params = list(ref.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(n_real):
        grads = torch.autograd.grad(discriminator_loss(ref(real[i : i + 1], real_labels[i : i + 1]), 1), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm > clip
        expected = [e + g * (clip / (norm + 1e-6)) for e, g in zip(expected, grads)]
    fake_loss = discriminator_loss(ref(fake, fake_labels), 0) * len(fake)
    expected = [(e + g) / 8 for e, g in zip(expected, torch.autograd.grad(fake_loss, params))]
    seen = []
    trainer.optimizer.original_optimizer.step = lambda: seen.append([p.grad.clone() for p in trainer.model.parameters()])
    trainer.optimizer.zero_grad(set_to_none=True)
    logits = trainer._step_with_exact_fakes(real, real_labels, fake, fake_labels)
    assert logits.shape == (n_real + len(fake),)
    assert len(seen) == 1 and trainer.history == [(0.0, trainer.sample_rate, 1)]
    for got, want in zip(seen[0], expected):
        assert torch.allclose(got, want, atol=1e-6), f"{mode}: update differs from its definition"


def test_an_unknown_fake_gradients_value_is_refused():
    with pytest.raises(ValueError, match="fake_gradients must be one of"):
        PrivacySettings(1.0, 1.0, 1e-5, fake_gradients="exactly")


def test_exact_fakes_trains_with_the_same_accounting_as_the_one_pass_step():
    torch.manual_seed(0)
    data = open_dataset("phantom", image_size=28).subset(range(128))
    histories = []
    for fake_gradients in ("clipped", "exact"):
        trainer = DiscriminatorTrainer(PGGAN(SHAPE), data.images, data.labels, 32,
                                       PrivacySettings(1.0, 1.0, 1e-5, "prv", fake_gradients=fake_gradients))
        stats = trainer.train(3)
        assert all(math.isfinite(s["d_loss"]) for s in stats)
        histories.append(trainer.history)
    assert histories[0] == histories[1] == [(1.0, sample_rate(128, 32), 3)]


def test_calibration_errors_and_history_merging():
    with pytest.raises(FedPGGANError, match="--epsilon"):
        calibrate_noise(0.0, 1e-5, 0.1, 100)
    assert extend_history([(1.0, 0.1, 5)], 1.0, 0.1, 3) == [(1.0, 0.1, 8)]
    assert extend_history([(1.0, 0.1, 5)], 2.0, 0.1, 3) == [(1.0, 0.1, 5), (2.0, 0.1, 3)]
    assert epsilon_of([], 1e-5) == 0.0


def test_a_calibration_cache_that_would_overspend_is_not_trusted(tmp_path, monkeypatch):
    """The on-disk cache is a file anyone with the account can edit (or a stale one, from another
    Opacus): a cached sigma is used only if the accountant confirms it meets the budget."""
    import json

    monkeypatch.setenv("FEDPGGAN_CACHE", str(tmp_path))
    sigma = calibrate_noise(2.0, 1e-5, 0.1, 50)
    cache = tmp_path / "calibration.json"
    poisoned = {key: 0.05 for key in json.loads(cache.read_text())}
    cache.write_text(json.dumps(poisoned))
    assert calibrate_noise(2.0, 1e-5, 0.1, 50) == sigma
    assert epsilon_of([(sigma, 0.1, 50)], 1e-5) <= 2.0


def test_an_epsilon_beyond_the_prv_accountants_range_names_the_fix():
    # a release with noise multiplier 0.02 (what --epsilon 1000 would ask for) breaks PRV's discretisation
    with pytest.raises(FedPGGANError, match="noise multiplier 0.02 .*use --accountant rdp"):
        epsilon_of([(0.02, 1.0, 1)], 1e-5, "prv")
    assert epsilon_of([(0.02, 1.0, 1)], 1e-5, "rdp") > 1000
    # ten million steps: PRV's grid would take ~145 GB, so it is refused before it is built
    with pytest.raises(FedPGGANError, match=r"grid of \d+ million points .* over 10000000 steps.*use --accountant rdp"):
        epsilon_of([(1.0, 0.032, 10**7)], 1e-5, "prv")


def site_setup(tmp_path, rounds=2):
    cfg = tiny_config(tmp_path / "run", epsilon=5.0, rounds=rounds, local_steps=2)
    data = open_dataset("phantom", image_size=28).subset(range(200))
    return cfg, data


def test_site_refuses_to_train_past_its_budget(tmp_path):
    cfg, data = site_setup(tmp_path, rounds=2)
    state = SiteState.load(tmp_path / "state", "run")
    for r in (1, 2):
        result = run_site_round(PGGAN(SHAPE), data, cfg, state, r, 0)
        assert result.status == "trained"
    assert result.privacy["epsilon"] <= 5.0
    # A third round was never planned: it would exceed the budget, so the site refuses.
    refused = run_site_round(PGGAN(SHAPE), data, cfg, state, 3, 0)
    assert refused.status == "exhausted" and state.exhausted
    assert refused.privacy["epsilon"] == pytest.approx(result.privacy["epsilon"])
    assert SiteState.load(tmp_path / "state", "run").exhausted  # persisted


def test_site_accountant_survives_a_restart(tmp_path):
    cfg, data = site_setup(tmp_path, rounds=3)
    uninterrupted = SiteState.load(tmp_path / "a", "run")
    for r in (1, 2, 3):
        eps_a = run_site_round(PGGAN(SHAPE), data, cfg, uninterrupted, r, 0).privacy["epsilon"]
    for r in (1, 2, 3):  # reload the state from disk before every round: a restarted site
        eps_b = run_site_round(PGGAN(SHAPE), data, cfg, SiteState.load(tmp_path / "b", "run"), r, 0).privacy["epsilon"]
    assert eps_b == pytest.approx(eps_a)
    assert SiteState.load(tmp_path / "b", "run").history == [list(h) for h in uninterrupted.history]


def test_a_state_restored_mid_run_counts_the_rounds_the_spend_journal_recorded_since(tmp_path):
    """site_state.json restored from a copy taken after round 1 would spend rounds 2 and 3 once more
    unseen; the journal, on another volume, recorded the step total of every round, so the site
    counts them again, and once it has used the journal a missing one is refused."""
    import shutil

    from client.site import journal_used, spend_journal

    cfg, data = site_setup(tmp_path, rounds=5)
    journal = str(tmp_path / "other-volume.jsonl")
    state = SiteState.load(tmp_path / "state", "run")
    run_site_round(PGGAN(SHAPE), data, cfg, state, 1, 0, journal=journal)
    shutil.copytree(tmp_path / "state", tmp_path / "backup")
    for r in (2, 3):
        spent = run_site_round(PGGAN(SHAPE), data, cfg, state, r, 0, journal=journal).privacy
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "backup", tmp_path / "state")  # the state dir restored from the copy of round 1
    restored = SiteState.load(tmp_path / "state", "run")
    again = run_site_round(PGGAN(SHAPE), data, cfg, restored, 2, 0, journal=journal).privacy
    assert again["total_steps"] == spent["total_steps"] + cfg.local_steps  # rounds 2 and 3 stay spent, then round 2 again
    assert again["epsilon"] > spent["epsilon"]
    assert journal_used(restored).exists()
    Path(journal).unlink()  # its volume not mounted: it must not read as a fresh journal
    with pytest.raises(FedPGGANError, match="spend-journal .* missing, but state dir .* has written to it before"):
        spend_journal({"spend-journal": journal}, restored)


def test_a_run_state_lost_after_it_spent_is_refused_not_started_over(tmp_path):
    """A lost state folder (or a state dir restored from a backup older than the run) would make a new
    noise key, draw a second release and restart the accountant below the run's spend; the journal
    records the release before it is drawn, so even a state lost before its first round's steps is caught."""
    import shutil

    cfg, data = site_setup(tmp_path)
    assert cfg.dp and cfg.embedding_weight > 0 and cfg.release_aggregation == "plain"
    journal = tmp_path / "other-volume.jsonl"
    run_site_round(PGGAN(SHAPE), data, cfg, SiteState.load(tmp_path / "state", "run"), 1, 0, journal=str(journal))
    lines = journal.read_text().splitlines()
    assert [sorted(json.loads(line)) for line in lines] == [["release", "run", "time"], ["run", "steps", "time"]]
    for kept in (lines, lines[:1]):  # after round 1, or after the release alone
        journal.write_text("\n".join(kept) + "\n")
        shutil.rmtree(tmp_path / "state", ignore_errors=True)
        lost = SiteState.load(tmp_path / "state", "run")
        with pytest.raises(FedPGGANError, match=r"site_state.json: this run's site state is missing or older than the run, "
                                                r"but spend-journal .* records its spend; restore .*state.run from a backup"):
            run_site_round(PGGAN(SHAPE), data, cfg, lost, 2, 0, journal=str(journal))
        assert journal.read_text().splitlines() == kept and not lost.noise_key
    journal.write_text("")  # a journal without this run's spend: a new run starts as ever
    assert run_site_round(PGGAN(SHAPE), data, cfg, SiteState.load(tmp_path / "state", "run"), 1, 0, journal=str(journal)).status == "trained"


def test_spend_is_recorded_before_training(tmp_path, monkeypatch):
    """Privacy first: a site that dies mid-round has already counted that round."""
    cfg, data = site_setup(tmp_path)
    state = SiteState.load(tmp_path / "s", "run")

    def crash(self, steps):
        raise RuntimeError("killed mid-round")

    monkeypatch.setattr(DiscriminatorTrainer, "train", crash)
    with pytest.raises(RuntimeError):
        run_site_round(PGGAN(SHAPE), data, cfg, state, 1, 0)
    reloaded = SiteState.load(tmp_path / "s", "run")
    # the one-shot embedding release first (a Gaussian mechanism: q = 1, one step), then the round
    assert reloaded.history[0] == [reloaded.release_noise, 1.0, 1]
    assert reloaded.history[-1][2] == cfg.local_steps
    assert reloaded.rounds["1"]["status"] == "reserved"


@pytest.mark.parametrize("count_share", [0.1, 0.5, 0.9])
def test_embedding_release_has_sensitivity_one_and_is_accounted(tmp_path, count_share):
    from fedpggan.privacy.feature_release import features_for
    from pggan_model.mean_embedding import class_means, record_sum

    data = open_dataset("phantom", image_size=28).subset(range(64))
    features = features_for((1, 28, 28), 50, seed=0)
    full = record_sum(features, data.images, data.labels, 2, count_share)
    for i in (0, 17, 63):  # removing any one record moves the sum by exactly norm 1, whatever the split
        keep = [j for j in range(64) if j != i]
        without = record_sum(features, data.images[keep], data.labels[keep], 2, count_share)
        assert float((full - without).norm()) == pytest.approx(1.0, abs=1e-9)
        assert float((full - without).norm()) <= 1.0
        assert float((full - without)[-1].norm()) == pytest.approx(count_share**0.5)  # the count's part of it
    means, counts = class_means(full, count_share)
    assert counts.tolist() == pytest.approx([float(c) for c in data.class_counts()], abs=1e-4)
    first = data.labels == 0
    assert torch.allclose(means[:, 0], features(data.images[first]).mean(0), atol=1e-5)
    # The site's history starts with the release, and the budget still holds at the end.
    cfg, site_data = site_setup(tmp_path, rounds=2)
    state = SiteState.load(tmp_path / "emb", "run")
    result = run_site_round(PGGAN(SHAPE), site_data, cfg, state, 1, 0)
    assert result.embedding_release is not None and tuple(result.embedding_release.shape) == (cfg.embedding_frequencies * 2 + 1, 2)
    assert state.history[0] == [state.release_noise, 1.0, 1]
    assert epsilon_of([tuple(h) for h in state.history], state.delta) == pytest.approx(result.privacy["epsilon"])


def test_the_server_decodes_releases_with_the_runs_count_share():
    """The server's class means equal the sites' exact means (no noise) only when it decodes with
    the count share the sites encoded with, so a run with a non-default share must pass it on."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord

    from fedpggan.config import RunConfig
    from fedpggan.privacy.feature_release import features_for, release_sum
    from pggan_model import GeneratorTrainer
    from server.federated_run import FederatedRun

    data = open_dataset("phantom", image_size=28).subset(range(64))
    features = features_for((1, 28, 28), 50, seed=0)
    server = object.__new__(FederatedRun)  # only what receive_release reads
    server.cfg = RunConfig(epsilon=float("inf"), embedding_count_share=0.3)
    server.features, server.class_names, server.releases, server.device = features, data.class_names, {}, "cpu"
    server.g_trainer, server.run_info = GeneratorTrainer(PGGAN(SHAPE)), {"sites": {"0": 40, "1": 24}}
    for site, part in enumerate((range(0, 40), range(40, 64))):
        total = release_sum(features, data.images[list(part)], data.labels[list(part)], 2, 0.3, None, None)
        assert server.receive_release(str(site), 1, SimpleNamespace(content={"embedding": ArrayRecord({"sum": total.float()})}))
    server.use_pooled_releases()
    _, target, _, classes = server.g_trainer.embedding
    assert classes is None  # both sites' releases pooled: every class has its target
    for k in range(2):
        exact = features(data.images[data.labels == k].double()).mean(0)
        assert torch.allclose(target[:, k].double(), exact, atol=1e-5), k


def test_a_class_no_pooled_release_holds_gets_no_embedding_target_until_one_does(capsys):
    """--fraction < 1: releases arrive over rounds. A class held only by sites not yet pooled has a count of
    pure noise and a "mean" far outside the data; the generators must not chase it."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord

    from fedpggan.config import RunConfig
    from fedpggan.privacy.feature_release import features_for, release_noise, release_sum
    from pggan_model import GeneratorTrainer
    from pggan_model.mean_embedding import embedding_loss
    from server.federated_run import FederatedRun

    data = open_dataset("phantom", image_size=28).subset(range(200))
    features = features_for((1, 28, 28), 50, seed=0)
    cfg = RunConfig(epsilon=10.0)
    sigma = release_noise(cfg.epsilon, cfg.embedding_share, 1e-5, cfg.accountant)
    server = object.__new__(FederatedRun)  # only what receive_release reads
    server.cfg, server.features, server.class_names, server.releases, server.device = cfg, features, data.class_names, {}, "cpu"
    server.g_trainer, server.run_info = GeneratorTrainer(PGGAN(SHAPE)), {"sites": {"0": 90, "1": 110}}
    server.release_sigma = lambda site: sigma
    generator = torch.Generator().manual_seed(0)
    for site, k in enumerate((0, 1)):  # site 0 holds only class 0, site 1 only class 1
        own = (data.labels == k).nonzero().flatten()
        total = release_sum(features, data.images[own], data.labels[own], 2, cfg.embedding_count_share, None, None)
        noisy = total + sigma * torch.randn(total.shape, generator=generator, dtype=total.dtype)
        assert server.receive_release(str(site), site + 1, SimpleNamespace(content={"embedding": ArrayRecord({"sum": noisy.float()})}))
        server.use_pooled_releases()  # after each round's replies
        _, means, _, classes = server.g_trainer.embedding
        if site == 0:
            assert classes.tolist() == [True, False]
            assert (f"class(es) {data.class_names[1]} left out: their counts do not stand out of the noise in the releases "
                    "of 1 of 2 sites") in capsys.readouterr().out
            assert server.release_noise_ratio == math.inf  # the gate reads the vouched classes: one class has no neighbour
            images, labels = torch.zeros(4, 1, 28, 28), torch.tensor([1, 1, 1, 1])
            assert embedding_loss(features, images, labels, means, classes) == 0  # no target for class 1 ...
            assert embedding_loss(features, images, labels, means) > 1  # ... whose noise "mean" lies far outside the data
        else:
            assert classes is None and server.release_noise_ratio < 1  # every site pooled: every class has its target


def test_a_class_no_site_holds_gets_no_embedding_target_also_with_every_release_pooled(capsys):
    """Label skew in a deployment: every site lists the class (an empty folder), none holds an image of it."""
    from fedpggan.config import RunConfig
    from fedpggan.privacy.feature_release import features_for, release_sum
    from pggan_model import GeneratorTrainer
    from server.federated_run import FederatedRun

    data = open_dataset("phantom", image_size=28).subset(range(200))
    features = features_for((1, 28, 28), 50, seed=0)
    server = object.__new__(FederatedRun)
    server.cfg, server.features, server.class_names, server.device = RunConfig(epsilon=math.inf), features, ["a", "b", "c"], "cpu"
    server.g_trainer, server.run_info = GeneratorTrainer(PGGAN(SHAPE)), {"sites": {"0": 200}}
    released = release_sum(features, data.images, data.labels, 3, server.cfg.embedding_count_share, None, None)
    server.use_release(released.double(), 0.0, 1)
    assert server.g_trainer.embedding[3].tolist() == [True, True, False]
    assert "class(es) c left out: their counts do not stand out of the noise in the releases of 1 of 1 sites" in capsys.readouterr().out


def test_a_plain_release_in_a_secure_run_is_rejected_not_used():
    """One site's share must not replace the securely summed target (a hostile or outdated site)."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord

    from fedpggan.config import RunConfig
    from fedpggan.privacy.feature_release import features_for
    from pggan_model import GeneratorTrainer
    from server.federated_run import FederatedRun

    events = []
    server = object.__new__(FederatedRun)  # only what receive_release reads: a release it would otherwise use
    server.cfg = RunConfig(epsilon=float("inf"), release_aggregation="secure")
    server.features, server.class_names, server.device = features_for((1, 28, 28), 50, seed=0), ["a", "b"], "cpu"
    server.releases, server.g_trainer = {}, GeneratorTrainer(PGGAN(SHAPE))
    server.ledger = SimpleNamespace(record_event=lambda *event: events.append(event))
    release = torch.ones(server.features.dim + 1, 2)
    assert not server.receive_release("3", 2, SimpleNamespace(content={"embedding": ArrayRecord({"sum": release})}))
    assert server.releases == {} and server.g_trainer.embedding is None
    assert events == [("3", 2, "rejected_release", "a plain embedding release in a run whose releases are summed securely")]


def test_release_noise_ratio_estimates_the_target_error_from_public_noise_only():
    """The server gates --embedding-steps on this estimate: it must track the true error of the
    noisiest class mean over the true class separation, which it cannot see."""
    from fedpggan.privacy.feature_release import features_for, release_sum
    from pggan_model.mean_embedding import class_means, release_noise_ratio

    data = open_dataset("phantom", image_size=28).subset(range(400))
    features = features_for((1, 28, 28), 50, seed=0)
    exact = class_means(release_sum(features, data.images, data.labels, 2, 0.1, None, None), 0.1)[0].double()
    separation = float((exact[:, 0] - exact[:, 1]).norm())
    assert release_noise_ratio(release_sum(features, data.images, data.labels, 2, 0.1, None, None), 0.1, 0.0) == 0.0
    for sigma in (0.2, 0.5, 1.0, 2.0):  # true ratios about 0.12, 0.3, 0.6 and 1.2
        ratios = []
        for draw in range(4):
            noisy = release_sum(features, data.images, data.labels, 2, 0.1, sigma, SeededNoise(draw))
            true = float((class_means(noisy, 0.1)[0].double() - exact).norm(dim=0).max()) / separation
            ratios.append((release_noise_ratio(noisy, 0.1, sigma**2), true))
        if sigma < 2:
            estimated, true = (sum(r[i] for r in ratios) / len(ratios) for i in (0, 1))
            assert 0.7 * true < estimated < 1.4 * true, (sigma, estimated, true)
        else:  # past the noise floor the estimate is rough (or inf), but never says "clean"
            assert all(estimated > 0.5 for estimated, _ in ratios), ratios


def test_embedding_steps_are_taken_only_while_the_release_is_clean(monkeypatch):
    from types import SimpleNamespace

    from flwr.app import ArrayRecord

    from fedpggan.config import RunConfig
    from fedpggan.privacy.feature_release import features_for, release_sum
    from pggan_model import GeneratorTrainer
    from server.federated_run import FederatedRun

    data = open_dataset("phantom", image_size=28).subset(range(400))
    features = features_for((1, 28, 28), 50, seed=0)
    calls = []
    monkeypatch.setattr(GeneratorTrainer, "embedding_step", lambda self, n, prior=None: calls.append(n) or 0.0)
    for sigma, expected_steps in ((0.05, 2 * 3), (50.0, 0)):
        server = object.__new__(FederatedRun)  # only what receive_release and fit_embedding read
        server.cfg = RunConfig(epsilon=1.0, g_steps=2, embedding_steps=3, embedding_noise_limit=0.5, g_batch_size=8)
        server.features, server.class_names, server.releases, server.device = features, data.class_names, {}, "cpu"
        server.g_trainer, server.prior, server.release_noise_ratio = GeneratorTrainer(PGGAN(SHAPE)), None, math.inf
        server.g_steps = server.cfg.g_steps  # what choose_generator_steps makes of a given --g-steps
        server.run_info = {"sites": {"0": 200, "1": 200}}
        server.mechanism_for = lambda n, s=sigma: (1.0, 0.1, 1e-5, s)
        for site, part in enumerate((range(0, 200), range(200, 400))):
            total = release_sum(features, data.images[list(part)], data.labels[list(part)], 2, 0.1, sigma,
                                SeededNoise(site))
            assert server.receive_release(str(site), 1, SimpleNamespace(content={"embedding": ArrayRecord({"sum": total.float()})}))
        server.use_pooled_releases()
        calls.clear()
        row = server.fit_embedding()
        assert row["embedding_steps"] == expected_steps == len(calls), sigma
        ratio = row["embedding_noise_ratio"]  # None: no release to judge; 0.0 would be a clean one
        assert (ratio is None or ratio > 0.5) if expected_steps == 0 else ratio < 0.5


def test_a_class_lost_next_to_a_similar_one_closes_the_gate_even_when_others_lie_far_apart():
    """The 4-class case (malignant next to benign, both far from chest X-rays): judged against the
    farthest class the release looked clean and the steps taught the small class noise."""
    from pggan_model.mean_embedding import release_noise_ratio, split_weights

    a, b = split_weights(0.1)
    means = torch.zeros(10, 3, dtype=torch.float64)
    means[0, 1], means[1, 2] = 0.1, 10.0  # classes 0 and 1 close together, class 2 far from both
    counts = torch.tensor([1000.0, 1000.0, 1000.0], dtype=torch.float64)
    released = torch.cat([a * means * counts, b * counts[None]], dim=0)
    noise_variance = (0.05 * a * 1000) ** 2 / 10  # noise of each class mean: 0.05, half the near gap
    assert release_noise_ratio(released, 0.1, noise_variance) == pytest.approx((0.05**2 / (0.1**2 - 2 * 0.05**2)) ** 0.5)
    assert release_noise_ratio(released, 0.1, 4 * noise_variance) > 0.5  # 0.1: as large as the near gap
