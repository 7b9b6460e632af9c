"""Centralised trainer (``fedpggan train``): the PGGAN on one machine, optionally with DP.

The same pieces run inside Flower (client/, server/): D steps through
:class:`~fedpggan.privacy.DiscriminatorTrainer`, generator steps through
:class:`~pggan_model.GeneratorTrainer`. Here one holder owns all the data, so it is also the
reference the federated runs are compared with.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from tqdm import tqdm

from fedpggan.build import (build_gan, open_training_data, pick_device, prior_tensor, seed_everything, with_resolved_dataset,
                            refuse_classes_without_images, warn_if_resized, warn_single_class, warn_without_dp)
from fedpggan.config import RunConfig
from fedpggan.data.sources import run_dataset_name
from fedpggan.errors import FedPGGANError
from fedpggan.plots import save_curves, save_sample_grid
from fedpggan.privacy import DiscriminatorTrainer, PrivacySettings
from fedpggan.privacy.dp_discriminator import mechanism_name
from fedpggan.privacy.feature_release import features_for, release_entry, release_history, release_sum
from fedpggan.privacy.ledger import PrivacyLedger, finite_or_none
from fedpggan.privacy.mechanism import site_mechanism
from fedpggan.privacy.noise import SEEDED_NOISE_WARNING, SecretNoise, SeededNoise, new_secret_key
from fedpggan.runs import RunFolder, default_run_dir, library_versions, now_iso
from fedpggan.train_resume import restore
from pggan_model import CASES, GeneratorTrainer, generator_step_summary, mean_stats, save_checkpoint
from pggan_model.mean_embedding import class_means, release_noise_ratio

CURVE_PANELS = {
    "losses": ["d_loss", "loss_g1", "loss_g2", "loss_embedding"],
    "D accuracy": ["d_acc_real", "d_acc_fake"],
    "average-loss rule cases": [f"case_{c}" for c in CASES],
    "epsilon": ["epsilon"],
}


def train_centralised(cfg: RunConfig, resume: bool = False) -> Path:
    """Train, writing config, ledger, metrics, checkpoints, grids and curves to the run folder;
    with ``resume``, continue the interrupted run in ``cfg.out`` (fedpggan.train_resume)."""
    if cfg.release_aggregation == "secure":
        raise FedPGGANError("--release-aggregation secure sums the releases of several sites; the centralised trainer has one: use 'plain'")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = open_training_data(cfg)
    refuse_classes_without_images(data)
    cfg = with_resolved_dataset(cfg, data)
    run = RunFolder(cfg.out or default_run_dir(), cfg.keep_checkpoints)
    gan = build_gan(cfg, data.image_size, data.channels, data.num_classes).to(device)
    g_trainer = GeneratorTrainer(gan)
    prior = prior_tensor(cfg, data.num_classes)
    n = len(data)
    g_steps_per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.d_steps)
    total_d_steps = cfg.epochs * g_steps_per_epoch * cfg.d_steps

    privacy, release, q = None, None, None
    # built before the folder is made, like the model and the noise: an option they cannot take leaves no folder
    features = features_for(data.image_shape, cfg.embedding_frequencies, cfg.seed, cfg.embedding_blur) if cfg.embedding_weight > 0 else None
    if cfg.dp:
        sigma, q, delta, release = site_mechanism(cfg, n, total_d_steps)
        privacy = PrivacySettings(sigma, cfg.max_grad_norm, delta, cfg.accountant, cfg.grad_sample_mode,
                                  cfg.fake_gradients)
    if not resume:  # made once the model and the noise are known to work: a bad option leaves no folder
        run.create()
    with run.held():  # one trainer per run folder: a second one would take the same steps again
        warn_without_dp(cfg)
        warn_single_class(data)
        warn_if_resized(data, cfg.image_size)
        if resume:
            planned = None if privacy is None else {"noise_multiplier": privacy.noise_multiplier, "sample_rate": q,
                                                    "delta": privacy.delta, "planned_steps": total_d_steps,
                                                    "public_num_records": n}
            resumed = restore(run, g_trainer, release_history(release), planned, data.sha256, cfg)
            run_info, ledger, first_epoch, history = resumed.run_info, resumed.ledger, resumed.first_epoch, resumed.history
        else:
            run_info, ledger = start(run, cfg, data, privacy, q, total_d_steps, release)
            first_epoch, history = 1, release_history(release)
        if not data.is_medical:
            print("warning: dataset 'phantom' is procedurally generated, NOT medical data")
        if cfg.dp and cfg.noise_key == "seed":
            print(SEEDED_NOISE_WARNING)

        # With DP and --noise-key secret, the noise comes from a key that lives only in this process.
        noise_key = new_secret_key() if cfg.dp and cfg.noise_key == "secret" else None
        embedding_steps, means = 0, None
        if cfg.embedding_weight > 0:  # the one-shot release, accounted before any DP-SGD step; never made twice
            if resume:
                means, noise_ratio = resumed.embedding_means, resumed.embedding_noise_ratio
            else:
                released = release_sum(features, data.images, data.labels, data.num_classes, cfg.embedding_count_share,
                                       release, SecretNoise(noise_key, "release") if noise_key else SeededNoise(cfg.seed))
                means = class_means(released, cfg.embedding_count_share)[0].cpu()
                noise_ratio = release_noise_ratio(released, cfg.embedding_count_share, release**2 if release is not None else 0.0)
                run_info["embedding_noise_ratio"] = finite_or_none(noise_ratio)
                run.write_run(run_info)
            g_trainer.match_embedding(features, means.to(device), cfg.embedding_weight)
            embedding_steps = cfg.embedding_steps_at(noise_ratio)
        d_trainer = DiscriminatorTrainer(gan, data.images, data.labels, cfg.batch_size, privacy, history=history, prior=prior,
                                         noise=SecretNoise(noise_key, "dp-sgd") if noise_key else None)
        bar = tqdm(range(first_epoch, cfg.epochs + 1), desc="epochs", unit="epoch", initial=first_epoch - 1, total=cfg.epochs)
        for epoch in bar:
            t0 = time.perf_counter()
            d_stats, g_stats = [], []
            for _ in tqdm(range(g_steps_per_epoch), desc=f"epoch {epoch}", unit="step", leave=False):  # an epoch can take minutes
                d_stats += d_trainer.train(cfg.d_steps)
                g_stats.append(g_trainer.step(cfg.g_batch_size, prior))
                for _ in range(embedding_steps):  # post-processing of the release (see --embedding-noise-limit)
                    g_trainer.embedding_step(cfg.g_batch_size, prior)
            row = {"epoch": epoch, "embedding_steps": embedding_steps * g_steps_per_epoch, **mean_stats(d_stats, ("d_loss", "d_acc_real", "d_acc_fake")),
                   **generator_step_summary(g_stats)}
            if privacy is not None:
                row["epsilon"] = d_trainer.epsilon()
                ledger.record_round("central", epoch, steps=g_steps_per_epoch * cfg.d_steps,
                                    noise_multiplier=privacy.noise_multiplier, sample_rate=d_trainer.sample_rate,
                                    epsilon=row["epsilon"], delta=privacy.delta)
            row["t_epoch"] = time.perf_counter() - t0  # training and accounting, as a federated round's t_round
            run.append_metrics(row)  # a resume drops rows past the ledger's last epoch
            bar.set_postfix(d_loss=f"{row['d_loss']:.3f}", eps=f"{row.get('epsilon', math.inf):.2f}")
            # The epoch is charged on disk before its weights are, and the ledger and its hash in run.json
            # move in step, so an interrupted run audits, exports and resumes as it stands.
            run.save_ledger(ledger, run_info)
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                path = run.checkpoint_path(epoch)
                sha = save_checkpoint(path, gan, generator_optim=g_trainer.state_dict(), run_config=cfg.to_flower(), round=epoch,
                                      embedding_means=means)
                ledger.record_checkpoint(epoch, path.name, sha)
                run.save_ledger(ledger, run_info)
                run.record_checkpoint(epoch, sha)  # listed (and older ones rotated) only once the ledger vouches for it
                save_sample_grid(gan, run.samples / f"epoch_{epoch:05d}.png", data.class_names,
                                 title=f"{data.name} epoch {epoch}")
        save_curves(run.read_metrics(), "epoch", CURVE_PANELS, run.curves / "training.png")
        run_info.update(status="completed", ended=now_iso(), final_epsilon=ledger.data["guarantee"]["epsilon"])
        run.write_run(run_info)
        eps = ledger.data["guarantee"]["epsilon"]
        print(f"done: {run.root}  epsilon={format(eps, '.4g') if eps is not None else 'no DP'}")
        return run.root


def start(run: RunFolder, cfg: RunConfig, data, privacy: PrivacySettings | None, q: float | None, total_d_steps: int,
          release: float | None) -> tuple[dict, PrivacyLedger]:
    """A new run's ledger (the mechanism registered) and run.json."""
    versions = library_versions()
    ledger = PrivacyLedger(run.root.resolve().name, cfg.dp, versions, mechanism_name(cfg.grad_sample_mode) if cfg.dp else "none",
                           cfg.to_flower(), noise_key=cfg.noise_key)
    if privacy is not None:
        ledger.register_site("central", budget_epsilon=cfg.epsilon, delta=privacy.delta, accountant=cfg.accountant,
                             noise_multiplier=privacy.noise_multiplier, sample_rate=q, max_grad_norm=cfg.max_grad_norm,
                             planned_steps=total_d_steps, public_num_records=len(data),
                             feature_release=None if release is None else dict(zip(("noise_multiplier", "sample_rate", "steps"),
                                                                                    release_entry(release))))
    run_info = {
        "run_id": run.root.resolve().name, "kind": "centralised", "config": cfg.to_flower(),
        "dataset": dataset_info(data), "num_sites": 1, "versions": versions, "seed": cfg.seed,
        "started": now_iso(), "status": "running",
    }
    run.save_ledger(ledger, run_info)
    return run_info, ledger


def dataset_info(data) -> dict:
    return {
        "name": run_dataset_name(data.name, data.is_medical),
        "source": data.source, "is_medical": data.is_medical, "num_classes": data.num_classes,
        "class_names": data.class_names, "image_size": data.image_size, "channels": data.channels,
        "num_records": len(data), "sha256": data.sha256,  # what a resume checks its data against
    }
