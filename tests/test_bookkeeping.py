"""Book-keeping clipping: the same clipped gradient sum as per-example autograd and as Opacus,
the same update and accounting as the Opacus paths, and a refusal of layers it cannot clip."""

from __future__ import annotations

import json

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.nn import functional as F

from fedpggan.audit.runner import audit_run
from fedpggan.data import open_dataset
from fedpggan.privacy import DiscriminatorTrainer, PrivacySettings
from fedpggan.privacy.bookkeeping import BookkeepingClipper
from fedpggan.privacy.noise import SecretNoise
from fedpggan.train import train_centralised
from pggan_model import PGGAN, ModelShape, discriminator_loss

from conftest import tiny_config

KEY = bytes(range(32))


class EveryLayer(nn.Module):
    """A discriminator-shaped model with every supported layer in the forms the clipper
    handles: biased and unbiased, strided and dilated convolutions, a Linear over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=2, dilation=2, bias=False)
        self.per_position = nn.Linear(4, 5)  # applied to [n, positions, 4]
        self.head = nn.Linear(5, 1)
        self.embed = nn.Embedding(3, 5)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.leaky_relu(self.norm(self.conv1(x)), 0.2))
        h = self.per_position(h.flatten(2).transpose(1, 2)).mean(1)
        return self.head(h).squeeze(1) + (self.embed(labels) * h).sum(1)


def per_example_clipped_sum(model, images, labels, targets, clip):
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(images)):
        loss = F.binary_cross_entropy_with_logits(model(images[i : i + 1], labels[i : i + 1]), targets[i : i + 1],
                                                  reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        total = [t + g * min(1.0, clip / (norm.item() + 1e-6)) for t, g in zip(total, grads)]
    return total, torch.stack(norms) if norms else torch.zeros(0)


def assert_close(got, want, what):
    # float32 rounding differs between CPUs and summation orders: compare to each tensor's own scale
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7, what


@pytest.mark.parametrize("model_name", ["every layer", "product D 28px", "product D 32px"])
def test_clipped_sum_equals_per_example_autograd(model_name):
    torch.manual_seed(0)
    if model_name == "every layer":
        model, images = EveryLayer(), torch.randn(7, 2, 9, 9)
        labels = torch.randint(0, 3, (7,))
    else:
        size = 28 if "28" in model_name else 32
        model, images = PGGAN(ModelShape(size, 1, 2, latent_dim=8, g_width=8, d_width=8)).d, torch.randn(7, 1, size, size)
        labels = torch.randint(0, 2, (7,))
    targets = (torch.arange(7) < 3).float()
    _, norms = per_example_clipped_sum(model, images, labels, targets, 1.0)
    clip = norms.median().item()  # some records are clipped, some are not
    want, _ = per_example_clipped_sum(model, images, labels, targets, clip)
    sums, logits = BookkeepingClipper(model).clipped_sum(images, labels, targets, clip)
    assert torch.allclose(logits, model(images, labels).detach())
    for (name, p), w in zip(model.named_parameters(), want):
        assert_close(sums[p], w, f"{model_name}: {name} differs from per-example autograd")


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_one_record_moves_the_clipped_sum_by_at_most_c(scale):
    """The sensitivity the Gaussian noise is calibrated for: adding any one record to a batch
    changes the clipped sum by a vector of norm at most C, however large its gradient."""
    torch.manual_seed(2)
    d = PGGAN(ModelShape(28, 1, 2, d_width=16)).d
    clipper, clip = BookkeepingClipper(d), 0.1
    moves = []
    for trial in range(5):
        batch, labels = torch.randn(9, 1, 28, 28) * scale, torch.randint(0, 2, (9,))
        targets = (torch.rand(9) < 0.5).float()
        without, _ = clipper.clipped_sum(batch[:8], labels[:8], targets[:8], clip)
        with_one, _ = clipper.clipped_sum(batch, labels, targets, clip)
        moved = torch.sqrt(sum((with_one[p] - without[p]).pow(2).sum() for p in d.parameters()))
        assert moved <= clip * (1 + 1e-4), f"trial {trial}: one record moved the sum by {moved:.6f} > C"
        moves.append(float(moved))
    assert max(moves) > clip * 0.99  # the bound is reached: these records were clipped, not merely small


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU path (one chunk per layer) is checked on a GPU"))])
def test_clipped_sum_equals_opacus_on_the_default_discriminator(device):
    """The product's D at its default widths, a batch of 100 (more than one chunk on a CPU): the
    layers where the ghost norm and the formed gradient are the cheaper choice are both exercised."""
    torch.manual_seed(1)
    d = PGGAN(ModelShape(28, 1, 2)).d.to(device)
    images, labels = torch.randn(100, 1, 28, 28, device=device), torch.randint(0, 2, (100,), device=device)
    targets = torch.ones(100, device=device)
    gsm = GradSampleModule(PGGAN(ModelShape(28, 1, 2)).d.to(device), batch_first=True, loss_reduction="sum")
    gsm._module.load_state_dict(d.state_dict())
    F.binary_cross_entropy_with_logits(gsm(images, labels), targets, reduction="sum").backward()
    per_sample = [p.grad_sample for p in gsm.parameters()]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample], 1).norm(dim=1)
    clip = norms.median().item()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' DPOptimizer.clip_and_accumulate
    sums, _ = BookkeepingClipper(d).clipped_sum(images, labels, targets, clip)
    for (name, p), g in zip(d.named_parameters(), per_sample):
        assert_close(sums[p], torch.einsum("i,i...", factor, g), f"{name} differs from Opacus' clipped sum")
    gsm._close()


@pytest.mark.parametrize("fake_gradients", ["exact", "clipped"])
@pytest.mark.parametrize("n_real", [3, 0])
def test_the_bookkeeping_step_is_the_opacus_paths_update(fake_gradients, n_real):
    """Noise off: the update is (sum of clipped real gradients [+ clipped fakes] + exact fakes) / B."""
    torch.manual_seed(0)
    shape = ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8)
    data = open_dataset("phantom", image_size=28).subset(range(64))
    gan = PGGAN(shape)
    clip = 0.05
    trainer = DiscriminatorTrainer(gan, data.images, data.labels, 8,
                                   PrivacySettings(0.0, clip, 1e-5, "prv", "bookkeeping", fake_gradients=fake_gradients))
    real, real_labels = data.images[:n_real], data.labels[:n_real]
    fake, fake_labels = gan.fake_batch(4)
    params = list(trainer.d.parameters())
    images, labels = torch.cat([real, fake]), torch.cat([real_labels, fake_labels])
    targets = (torch.arange(len(images)) < n_real).float()
    clipped_rows = len(images) if fake_gradients == "clipped" else n_real
    expected, _ = per_example_clipped_sum(trainer.d, images[:clipped_rows], labels[:clipped_rows],
                                          targets[:clipped_rows], clip)
    if fake_gradients == "exact":
        fake_loss = discriminator_loss(trainer.d(fake, fake_labels), 0) * len(fake)
        expected = [e + g for e, g in zip(expected, torch.autograd.grad(fake_loss, params))]
    seen = []
    trainer.optimizer.step = lambda: seen.append([p.grad.clone() for p in params])
    logits = trainer._bookkeeping_step(real, real_labels, fake, fake_labels)
    assert logits.shape == (n_real + len(fake),)
    assert len(seen) == 1 and trainer.history == [(0.0, trainer.sample_rate, 1)]
    assert trainer.expected_batch_size == 8
    for got, want in zip(seen[0], expected):
        assert torch.allclose(got, want / 8, atol=1e-6), f"{fake_gradients}: update differs from its definition"


def test_bookkeeping_trains_with_the_accounting_of_opacus_hooks():
    torch.manual_seed(0)
    data = open_dataset("phantom", image_size=28).subset(range(128))
    shape = ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8)
    trainers = [DiscriminatorTrainer(PGGAN(shape), data.images, data.labels, 32,
                                     PrivacySettings(1.2, 1.0, 1e-5, "prv", mode), history=[(0.9, 0.25, 5)])
                for mode in ("hooks", "bookkeeping")]
    before = {k: v.clone() for k, v in trainers[1].gan.d.state_dict().items()}
    for trainer in trainers:
        stats = trainer.train(4)
        assert all(torch.isfinite(torch.tensor(s["d_loss"])) for s in stats)
    assert trainers[0].history == trainers[1].history == [(0.9, 0.25, 5), (1.2, 0.25, 4)]
    assert trainers[0].epsilon() == trainers[1].epsilon()
    assert any(not torch.equal(before[k], v) for k, v in trainers[1].gan.d.state_dict().items())


@pytest.mark.parametrize("fakes", ["exact", "clipped"])
def test_bookkeeping_draws_its_masks_and_noise_from_the_secret_stream(fakes):
    """The same key replays the same steps whatever PyTorch's generator holds; another key does not.
    The fakes are fixed, so the Poisson masks and the Gaussian noise are the only draws left: were
    either taken from PyTorch's generator (seeded from run.json's --seed), the two seeds would differ."""
    data = open_dataset("phantom", image_size=28).subset(range(64))
    shape = ModelShape(28, 1, 2, latent_dim=8, g_width=16, d_width=8)
    torch.manual_seed(0)
    with torch.no_grad():
        fixed = PGGAN(shape).fake_batch(16)
    results = []
    for key, torch_seed in ((KEY, 0), (KEY, 1), (bytes(32), 0)):
        torch.manual_seed(0)
        gan = PGGAN(shape)
        gan.fake_batch = lambda n, prior=None: fixed
        privacy = PrivacySettings(2.0, 0.5, 1e-5, "prv", "bookkeeping", fake_gradients=fakes)
        trainer = DiscriminatorTrainer(gan, data.images, data.labels, 16, privacy, noise=SecretNoise(key, "steps"))
        torch.manual_seed(torch_seed)
        trainer.train(2)
        results.append(torch.cat([p.flatten() for p in gan.d.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    trainer = DiscriminatorTrainer(PGGAN(shape), data.images, data.labels, 16,
                                   PrivacySettings(2.0, 0.5, 1e-5, "prv", "bookkeeping"), noise=SecretNoise(KEY, "std"))
    draws = torch.cat([trainer._gaussian(p, 1.0).flatten() for p in trainer.d.parameters()])
    assert abs(draws.std().item() - 1.0) < 0.05  # the step asks for std sigma C


def test_layers_it_cannot_clip_are_refused_with_the_fix():
    class WithBatchNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    with pytest.raises(ValueError, match="does not support BatchNorm2d.*--grad-sample-mode hooks"):
        BookkeepingClipper(WithBatchNorm())
    with pytest.raises(ValueError, match="ungrouped.*--grad-sample-mode hooks"):
        BookkeepingClipper(nn.Conv2d(2, 2, 3, groups=2))

    class TwoLookups(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(4, 3)

        def forward(self, x, labels):
            return self.embed(labels).sum((1, 2)) + x.sum(1)

    with pytest.raises(ValueError, match="once per record"):
        BookkeepingClipper(TwoLookups()).clipped_sum(torch.randn(2, 3), torch.zeros(2, 2, dtype=torch.long),
                                                     torch.ones(2), 1.0)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, labels):
            return self.lin(self.lin(x)).sum(1)

    with pytest.raises(ValueError, match="exactly once"):
        BookkeepingClipper(Twice()).clipped_sum(torch.randn(2, 3), torch.zeros(2), torch.ones(2), 1.0)


def test_a_bookkeeping_run_names_its_mechanism_and_passes_the_audit(tmp_path):
    run = train_centralised(tiny_config(tmp_path / "run", epsilon=5.0, grad_sample_mode="bookkeeping"))
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert ledger["mechanism"] == "DP-SGD on D, per-sample clipping by book-keeping, Opacus accountant"
    report = audit_run(run)
    assert report["passed"], report["findings"]
