"""The PGGAN model: the average-loss rule, shapes, sampling, checkpoints, Opacus validity."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator

from fedpggan.errors import FedPGGANError
from pggan_model import (PGGAN, GANConfig, GeneratorTrainer, ModelShape, gan_from_checkpoint, generator_rule_loss, load_checkpoint,
                         save_checkpoint)
from pggan_model.losses import rule_weights


def rule_grads(l1: float, l2: float, rule: str = "average") -> tuple[float, float, dict]:
    """Gradients of the rule loss w.r.t. two single-sample logits (stand-ins for G1, G2 outputs)."""
    x1 = torch.tensor([l1], requires_grad=True)
    x2 = torch.tensor([l2], requires_grad=True)
    out = generator_rule_loss(x1, x2, rule)
    out.loss.backward()
    return float(x1.grad), float(x2.grad), out.cases


def d_nonsat(logit: float) -> float:
    """d/dlogit of -log sigmoid(logit)."""
    return float(-torch.sigmoid(torch.tensor(-logit)))


@pytest.mark.parametrize(
    "l1, l2, w1, w2, case",
    [
        (-1.0, -2.0, 0.5, 0.5, "neither"),  # D prefers real data: both learn from the average
        (1.5, -1.0, 0.0, 1.0, "only_g1"),  # G1 fools D: only G2 learns, from l2
        (-0.5, 2.0, 1.0, 0.0, "only_g2"),  # G2 fools D: only G1 learns, from l1
        (0.5, 3.0, 0.5, 0.5, "both"),  # both fool D: average
    ],
)
def test_average_loss_rule_gives_exact_per_generator_gradients(l1, l2, w1, w2, case):
    g1, g2, cases = rule_grads(l1, l2)
    assert g1 == pytest.approx(w1 * d_nonsat(l1))
    assert g2 == pytest.approx(w2 * d_nonsat(l2))
    if w1 == 0:
        assert g1 == 0.0
    if w2 == 0:
        assert g2 == 0.0
    assert cases[case] == 1 and sum(cases.values()) == 1


def test_mean_and_single_rules():
    g1, g2, _ = rule_grads(1.5, -1.0, "mean")
    assert g1 == pytest.approx(0.5 * d_nonsat(1.5)) and g2 == pytest.approx(0.5 * d_nonsat(-1.0))
    g1, g2, _ = rule_grads(1.5, -1.0, "single")
    assert g1 == pytest.approx(d_nonsat(1.5)) and g2 == 0.0
    with pytest.raises(ValueError):
        rule_weights(torch.zeros(1), torch.zeros(1), "bogus")


def test_the_options_offer_exactly_the_rules_the_model_knows():
    """fedpggan.config keeps its own copy (it imports no torch, the model library no fedpggan)."""
    from fedpggan.config import LOSS_RULES, RunConfig
    from pggan_model import LOSS_RULES as MODEL_RULES

    assert LOSS_RULES == MODEL_RULES
    assert next(f for f in dataclasses.fields(RunConfig) if f.name == "loss_rule").metadata["choices"] == MODEL_RULES


def test_rule_gradients_reach_only_the_learning_generator():
    """End to end through the networks: a generator that must not learn gets zero gradient."""
    torch.manual_seed(0)
    gan = PGGAN(ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8))
    labels = torch.zeros(4, dtype=torch.long)
    z = torch.randn(4, 8)
    logits1 = gan.d(gan.g1(z, labels), labels)
    # Force the case "only G1 judged real" for every sample by shifting the logits.
    shifted1, shifted2 = logits1 - logits1.detach() + 5.0, gan.d(gan.g2(z, labels), labels)
    shifted2 = shifted2 - shifted2.detach() - 5.0
    generator_rule_loss(shifted1, shifted2).loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in gan.g1.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in gan.g2.parameters())


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("classes", [2, 5])
def test_shapes_and_opacus_validity(size, channels, classes):
    gan = PGGAN(ModelShape(size, channels, classes, latent_dim=8, g_width=16, d_width=8))
    ModuleValidator.validate(gan.d, strict=True)
    images, labels = gan.sample(6)
    assert images.shape == (6, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert gan.d(images, labels).shape == (6,)


def test_unsupported_size_is_a_one_line_error():
    with pytest.raises(FedPGGANError, match="--image-size 30"):
        PGGAN(ModelShape(30, 1, 2))


def test_sampling_per_class_and_generator_choice():
    torch.manual_seed(0)
    gan = PGGAN(ModelShape(28, 1, 3, latent_dim=8, g_width=16, d_width=8))
    labels = torch.full((5,), 2)
    _, out = gan.sample(5, labels)
    assert out.tolist() == [2] * 5
    torch.manual_seed(1)
    only_g1, _ = gan.sample(4, labels[:4], generator="1")
    torch.manual_seed(1)
    only_g2, _ = gan.sample(4, labels[:4], generator="2")
    assert not torch.allclose(only_g1, only_g2)  # independent weights


def test_generators_are_independent_and_ema_moves():
    torch.manual_seed(0)
    gan = PGGAN(ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8))
    before = [p.clone() for p in gan.ema1.parameters()]
    trainer = GeneratorTrainer(gan)
    stats = trainer.step(16)
    assert sum(stats[f"case_{c}"] for c in ("neither", "only_g1", "only_g2", "both")) == 16
    assert any(not torch.equal(a, b) for a, b in zip(before, gan.ema1.parameters()))
    assert not any(p is q for p, q in zip(gan.g1.parameters(), gan.g2.parameters()))


def test_checkpoint_round_trip_restores_identical_outputs(tmp_path):
    torch.manual_seed(0)
    shape = ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8)
    gan = PGGAN(shape)
    GeneratorTrainer(gan).step(8)
    sha = save_checkpoint(tmp_path / "c.pt", gan, round=1)
    assert len(sha) == 64
    other = PGGAN(shape)
    load_checkpoint(tmp_path / "c.pt", other)
    torch.manual_seed(5)
    a, _ = gan.sample(4, torch.tensor([0, 1, 0, 1]))
    torch.manual_seed(5)
    b, _ = other.sample(4, torch.tensor([0, 1, 0, 1]))
    assert torch.equal(a, b)
    mismatched = PGGAN(ModelShape(28, 1, 3, latent_dim=8, g_width=16, d_width=8), GANConfig(loss_rule="mean"))
    with pytest.raises(FedPGGANError, match="shape.num_classes") as err:
        load_checkpoint(tmp_path / "c.pt", mismatched)
    assert "\n" not in str(err.value)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FedPGGANError, match="unreadable"):
        load_checkpoint(tmp_path / "bad.pt", gan)


class RunsCode:
    """A pickle that would run code when loaded (as a .pt someone hands to --checkpoint could)."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["FEDPGGAN_TEST_MARKER"]),))


def test_a_checkpoint_is_read_as_data_never_run_as_code(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPGGAN_TEST_MARKER", str(tmp_path / "ran"))
    gan = PGGAN(ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8))
    save_checkpoint(tmp_path / "c.pt", gan, round=1, extra=RunsCode())
    with pytest.raises(FedPGGANError, match="unreadable"):
        gan_from_checkpoint(tmp_path / "c.pt")
    assert not (tmp_path / "ran").exists()
    torch.save({"format": 1, "model_config": {"shape": {"pixels": 28}, "gan": {}}, "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(FedPGGANError, match="cannot build the checkpoint's model"):
        gan_from_checkpoint(tmp_path / "other.pt")


def test_embedding_loss_trains_the_mixture_of_both_generators():
    import copy

    from pggan_model.mean_embedding import RandomFourierFeatures

    torch.manual_seed(0)
    gan = PGGAN(ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8))
    features = RandomFourierFeatures(28 * 28, 20, seed=0)
    stepped = {}
    for weight in (0.0, 5.0):  # the same draws, with and without the embedding term
        twin = copy.deepcopy(gan)
        trainer = GeneratorTrainer(twin)
        trainer.match_embedding(features, torch.zeros(features.dim, 2), weight=weight)
        torch.manual_seed(1)
        stats = trainer.step(8)
        stepped[weight] = twin
    assert "loss_embedding" not in GeneratorTrainer(gan).step(8) and stats["loss_embedding"] > 0
    for g in ("g1", "g2"):  # the term reaches both generators' updates
        plain, matched = (getattr(stepped[w], g).parameters() for w in (0.0, 5.0))
        assert any(not torch.equal(a, b) for a, b in zip(plain, matched)), g


def test_blurred_frequencies_read_image_structure_rather_than_pixel_noise():
    from pggan_model.mean_embedding import RandomFourierFeatures

    white = RandomFourierFeatures(28 * 28, 200, seed=0)
    blurred = RandomFourierFeatures(28 * 28, 200, seed=0, image_shape=(1, 28, 28), blur=1.0)
    assert torch.allclose(blurred.weight.norm(dim=0), white.weight.norm(dim=0))  # same bandwidth budget
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(256, 1, 28, 28, generator=gen)
    coarse = torch.randn(256, 1, 7, 7, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=28, mode="bilinear", align_corners=False)
    smooth *= noise.std() / smooth.std()  # the same pixel spread as the noise
    def structure_over_noise(f):
        return float((smooth.flatten(1) @ f.weight).var() / (noise.flatten(1) @ f.weight).var())
    assert structure_over_noise(blurred) > 3 * structure_over_noise(white)
    phi = blurred(noise)
    assert torch.allclose(phi.norm(dim=1), torch.ones(256), atol=1e-5)  # unit norm: the release's sensitivity holds
    with pytest.raises(ValueError, match="image shape"):
        RandomFourierFeatures(28 * 28, 20, seed=0, blur=1.0)


def test_embedding_step_fits_the_target_without_touching_d():
    from pggan_model.mean_embedding import RandomFourierFeatures

    torch.manual_seed(0)
    gan = PGGAN(ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8))
    trainer = GeneratorTrainer(gan)
    with pytest.raises(RuntimeError, match="match_embedding"):
        trainer.embedding_step(8)
    features = RandomFourierFeatures(28 * 28, 20, seed=0)
    trainer.match_embedding(features, torch.zeros(features.dim, 2), weight=5.0)
    d_before = [p.clone() for p in gan.d.parameters()]
    ema_before = [p.clone() for p in gan.ema2.parameters()]
    losses = [trainer.embedding_step(16) for _ in range(30)]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])  # it fits the target
    assert all(torch.equal(a, b) for a, b in zip(d_before, gan.d.parameters()))
    assert all(p.grad is None for p in gan.d.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, gan.ema2.parameters()))  # both generators, and their EMA
    # no class with a target (a budget too small for the release): the steps learn nothing, and do not fail
    trainer.match_embedding(features, torch.zeros(features.dim, 2), weight=5.0, classes=torch.tensor([False, False]))
    g_before = [p.clone() for p in gan.g1.parameters()]
    assert math.isnan(trainer.embedding_step(16)) and math.isnan(trainer.step(16)["loss_embedding"])
    assert any(not torch.equal(a, b) for a, b in zip(g_before, gan.g1.parameters()))  # the adversarial step still learns


def test_step_stats_average_what_was_logged_and_sum_the_rule_cases():
    import math

    from pggan_model import CASES, generator_step_summary, mean_stats

    d_steps = [{"d_acc_real": 0.5}, {"d_acc_real": math.nan}, {"d_acc_real": 1.0}]  # NaN: an empty Poisson batch
    assert mean_stats(d_steps, ("d_acc_real",)) == {"d_acc_real": 0.75}
    single = [{"loss_g1": 1.0, "loss_g2": math.nan, **{f"case_{c}": 2.0 for c in CASES}}] * 2  # --loss-rule single
    summary = generator_step_summary(single)
    assert summary["loss_g1"] == 1.0 and math.isnan(summary["loss_g2"]) and "loss_embedding" not in summary
    assert all(summary[f"case_{c}"] == 4.0 for c in CASES)
    assert generator_step_summary([{**s, "loss_embedding": 3.0} for s in single])["loss_embedding"] == 3.0
