"""``evaluate_run``: the whole suite for one run folder (centralised or federated).

Order: load the checkpoint and the real data, TSTR over seeds, TRTR over seeds (its first
classifier then serves as the real-trained feature extractor and label judge), fidelity
and diversity of the first seed's synthetic set against the real test split, memorisation
against the real training split, then the JSON / markdown / PNG report.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpggan.build import pick_device, refuse_classes_without_images
from fedpggan.config import EVALUATION_REPORT_SIZE
from fedpggan.data import ImageDataset, open_dataset
from fedpggan.data.sources import SITE_DATA, public_name
from fedpggan.errors import FedPGGANError
from fedpggan.evaluation.classifier import WIDTHS, SmallCNN, TrainingBudget, embed
from fedpggan.evaluation.dcr import memorisation
from fedpggan.evaluation.fidelity import NEAREST_K, class_diversity, frechet_distance, label_fidelity, prdc_scores
from fedpggan.evaluation.report import save_comparison_grid, write_report
from fedpggan.evaluation.utility import check_matches_gan, scores_over_seeds, seed_list, synthetic_set, tstr
from fedpggan.io import sha256_file
from fedpggan.runs import (RunFolder, current_options, ledger_checkpoints, library_versions, now_iso,
                           recorded_generator_steps)
from pggan_model import PGGAN, gan_from_checkpoint

CLASSIFIER = (f"SmallCNN: 3 x [conv3x3 stride 2, GroupNorm, ReLU] widths {WIDTHS}, global average pool, "
              "linear; Adam, cross-entropy")


EVALUATION_SPLITS = ("test", "val")


def evaluate_run(run_dir: str | Path, real_spec: str | None = None, data_dir: str | None = None,
                 n_synthetic: int = EVALUATION_REPORT_SIZE["n_synthetic"],
                 seeds: int | Sequence[int] = EVALUATION_REPORT_SIZE["seeds"], generator: str = "both",
                 budget: TrainingBudget = TrainingBudget(), device: str = "auto", out: str | Path | None = None,
                 checkpoint: str | Path | None = None, progress: bool = True, split: str = "test") -> dict[str, Any]:
    """Evaluate a run's EMA generators; write evaluation.json, EVALUATION.md and
    evaluation_grid.png to ``out`` (default: the run folder) and return the JSON dict.

    ``real_spec`` takes the same forms as ``--dataset`` (default: the run's own dataset);
    ``checkpoint`` a .pt file, a file name in RUN/checkpoints or a round (default: newest verified);
    ``split`` the real split the figures are measured on: "test" (what results report) or "val"
    (to compare settings without choosing them on the split that is reported)."""
    if split not in EVALUATION_SPLITS:
        raise FedPGGANError(f"--split {split}: choose one of {', '.join(EVALUATION_SPLITS)}")
    run = RunFolder(run_dir)
    if not run.root.is_dir():
        raise FedPGGANError(f"{run.root}: no such run folder; pass the folder a training run wrote (--out)")
    if n_synthetic <= NEAREST_K:  # checked now, not after minutes of classifier training
        raise FedPGGANError(f"--n-synthetic {n_synthetic}: PRDC's {NEAREST_K} nearest neighbours need more synthetic "
                            f"images; give at least {NEAREST_K + 1} (report default {EVALUATION_REPORT_SIZE['n_synthetic']})")
    info = run.read_run()
    seeds = seed_list(seeds)
    size = smaller_than_report(n_synthetic, len(seeds), budget)
    out = writable_out(run, out, split, size["quick"])  # checked before minutes of evaluation, like the ledger
    ckpt = run.latest_checkpoint()[0] if checkpoint is None else run.checkpoint_file(str(checkpoint))
    ckpt_sha = sha256_file(ckpt)
    guarantee = ledger_guarantee(run, ckpt_sha)
    dev = pick_device(device)
    gan, payload = gan_from_checkpoint(ckpt, dev)
    spec, data_dir = real_dataset_spec(info, real_spec, data_dir)
    # "test" names the split the figures are measured on, also when it is val
    trained_classes = (info.get("dataset") or {}).get("class_names") or []
    train, test = (open_real(spec, part, data_dir, gan.shape.image_size, int(info.get("seed", 0))).in_class_order(trained_classes, "--real")
                   for part in ("train", split))
    for real in (train, test):
        check_matches_gan(real, gan)
    # TRTR, the reference, must learn every class (a site's own folder may lack one: label skew)
    refuse_classes_without_images(train, "pass --real data that hold every class, e.g. the pooled or public data")
    check_enough_test_images(test, spec)

    utility = tstr(gan, None, test, n_synthetic, seeds, generator, budget, dev, progress)
    trtr_summary, real_models = scores_over_seeds(lambda _: (train.images, train.labels), test, seeds, budget, dev,
                                                  desc="TRTR", progress=progress)
    judge = real_models[0]
    # in the test split's class mix: FID, PRDC, label fidelity (against the judge's accuracy on that
    # split) and the memorisation baseline compare with real images, and must not measure the mix
    fake, fake_labels = synthetic_set(gan, n_synthetic, generator, seeds[0], class_mix=test.class_counts())
    _, fake_feats = embed(judge, fake)
    _, real_feats = embed(judge, test.images)
    # precision/recall depend on set sizes: compare equally many synthetic and real images (at most
    # n_synthetic of each, so a large test split does not need a test-size-squared distance matrix)
    prdc_size = min(len(fake), len(test))
    rng = np.random.default_rng(seeds[0])
    pick_fake, pick_real = rng.permutation(len(fake))[:prdc_size], rng.permutation(len(test))[:prdc_size]
    fidelity = label_fidelity(judge, fake, fake_labels)
    fidelity["real_test_reference"] = trtr_summary["accuracy"]["per_seed"][0]

    result = {
        "run": str(run.root), "run_id": info.get("run_id"), "run_kind": info.get("kind"), "created": now_iso(),
        "run_g_steps": recorded_generator_steps(info) if info.get("kind") == "federated" else None,
        "run_d_noise": (info.get("generator_steps") or {}).get("averaged_d_noise"),
        "checkpoint": {"file": ckpt.name, "round": payload.get("round"), "sha256": ckpt_sha},
        **guarantee,
        "dataset": {"name": test.name, "spec": spec, "split": split, "class_names": test.class_names, "channels": test.channels,
                    "image_size": test.image_size, "n_train": len(train), "n_test": len(test)},
        "device": str(dev),
        "settings": {"n_synthetic": n_synthetic, "seeds": seeds,
                     "labels": f"balanced for TSTR and per-class diversity; the real {split} split's class mix for "
                               "FID, PRDC, label fidelity and memorisation",
                     "generator": "1" if gan.single else generator,  # what was sampled, as export records it
                     "classifier": CLASSIFIER, "classifier_budget": budget_text(budget), "lr": budget.lr,
                     "feature_reference": f"real {split} split", "prdc_nearest_k": NEAREST_K, "prdc_images_per_side": prdc_size,
                     **size},
        "tstr": utility["tstr"], "trtr": trtr_summary,
        "fid": frechet_distance(real_feats, fake_feats),
        "prdc": prdc_scores(real_feats[pick_real], fake_feats[pick_fake]),
        "label_fidelity": fidelity,
        # per class: a rare class of the test mix would get too few images to judge its spread
        "diversity": class_diversity(real_feats, test.labels.numpy(), *balanced_feats(judge, gan, n_synthetic, generator, seeds[0]),
                                     test.class_names),
        "memorisation": memorisation(fake, train.images, test.images, seeds[0]),
        "versions": library_versions(),
    }
    # the grid first, evaluation.json last: a failure in between leaves the last complete report's JSON
    out.mkdir(parents=True, exist_ok=True)
    save_comparison_grid(test.images, test.labels, fake, fake_labels, test.class_names, out / "evaluation_grid.png")
    text = write_report(result, out)
    print(text)
    print(f"written: {out / 'evaluation.json'}, {out / 'EVALUATION.md'}, {out / 'evaluation_grid.png'}")
    return result


def balanced_feats(judge: SmallCNN, gan: PGGAN, n: int, generator: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The judge's features of a class-balanced synthetic set (as TSTR draws it) and its labels."""
    images, labels = synthetic_set(gan, n, generator, seed)
    return embed(judge, images)[1], labels.numpy()


def smaller_than_report(n_synthetic: int, num_seeds: int, budget: TrainingBudget) -> dict[str, Any]:
    """``quick``: the evaluation is smaller than the report defaults (as ``--quick`` makes it), so its
    figures are a smoke check; ``short_of_report`` says where, for whoever quotes the figures."""
    short = [f"{have} {what} (report: {want})" for have, want, what in (
        (n_synthetic, EVALUATION_REPORT_SIZE["n_synthetic"], "synthetic images"),
        (num_seeds, EVALUATION_REPORT_SIZE["seeds"], "seed(s)"),
        (budget.steps_for(n_synthetic), EVALUATION_REPORT_SIZE["steps"], "classifier steps on the synthetic set"))
        if have is not None and have < want]
    return {"quick": bool(short), "short_of_report": short}


def budget_text(budget: TrainingBudget) -> str:
    amount = f"{budget.steps} steps" if budget.epochs is None else f"{budget.epochs:g} epochs"
    return f"{amount} of batch {budget.batch_size}"


def writable_out(run: RunFolder, out: str | Path | None, split: str, quick: bool) -> Path:
    """The report's folder, checked now but made only when the report is written (a refused evaluation
    leaves nothing behind). A val-split or quick evaluation does not replace a full test-split report
    in the run folder (the one export publishes): it needs a folder of its own."""
    out = run.root if out is None else Path(out)
    if run.check_report_folder(out) and (split != "test" or quick):
        previous = run.root / "evaluation.json"
        try:
            full = previous.is_file() and is_full_test_report(json.loads(previous.read_text()))
        except (OSError, ValueError):
            full = False  # an unreadable report is replaced, as before
        if full:
            raise FedPGGANError(f"{previous} holds a full test-split evaluation (the one export publishes); give a "
                                f"{'quick' if quick else split + '-split'} evaluation its own folder with --out")
    existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(0, "a file is in the way")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise FedPGGANError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable folder") from exc
    return out


def is_full_test_report(report: Any) -> bool:
    return (isinstance(report, dict) and (report.get("dataset") or {}).get("split", "test") == "test"
            and not (report.get("settings") or {}).get("quick"))


def real_dataset_spec(info: dict[str, Any], real_spec: str | None, data_dir: str | None) -> tuple[str, str | None]:
    """``--real`` if given, else the dataset the run was trained on: run.json's ``dataset`` option, or
    for ``auto`` (a deployed coordinator's) the public name the sites reported. A hospital's own data
    ("site data") is not on the coordinator's machine, so it needs ``--real``."""
    config = current_options(info)  # where a resume moved the data, not where the run began
    data_dir = data_dir or config.get("data-dir") or None
    if real_spec:
        return real_spec, data_dir
    spec = str(config.get("dataset", "auto"))
    if spec == "auto":
        spec = public_name(str((info.get("dataset") or {}).get("name", SITE_DATA)))
        if spec == SITE_DATA:
            raise FedPGGANError("run.json: the sites trained on their own data, which the coordinator does not hold; "
                                "give --real a test split of the same kind (an .npz in MedMNIST layout or an ImageFolder)")
    return spec, data_dir


def open_real(spec: str, split: str, data_dir: str | None, image_size: int, seed: int) -> ImageDataset:
    """A split of the real data at the run's image size (``seed`` matters only for phantom,
    whose training split then equals the run's training data)."""
    try:
        return open_dataset(spec, split, data_dir, image_size, seed, named_by="--real")
    except FedPGGANError as exc:
        raise FedPGGANError(f"--real ({split} split): {exc}") from exc


def check_enough_test_images(test: ImageDataset, spec: str) -> None:
    """TSTR's AUC needs every class in the real test split, and FID and PRDC's k-nearest
    neighbours need more images than k; a smaller split would fail deep in the metrics."""
    counts = np.bincount(test.labels.numpy(), minlength=test.num_classes)
    if len(test) <= NEAREST_K or not counts.all():
        missing = [name for name, c in zip(test.class_names, counts) if not c]
        raise FedPGGANError(f"--real {spec}: the test split has {len(test)} images"
                            f"{' and none of ' + ', '.join(missing) if missing else ''}; the evaluation needs more than "
                            f"{NEAREST_K} real test images with every class present")


def ledger_guarantee(run: RunFolder, checkpoint_sha256: str) -> dict[str, Any]:
    """The run's privacy guarantee from the ledger run.json vouches for: epsilon (max over sites)
    and delta, both None for a run without DP; ``ledger`` says whether there was such a ledger, so
    that a missing or edited one is not reported as "no DP". The guarantee holds for the checkpoints
    the ledger lists, not for a .pt file from elsewhere (``--checkpoint``)."""
    ledger = run.vouched_ledger()
    if ledger is None:
        return {"epsilon": None, "delta": None, "ledger": "missing, or not the one run.json records"}
    if checkpoint_sha256 not in {c.get("sha256") for c in ledger_checkpoints(ledger)}:
        return {"epsilon": None, "delta": None, "ledger": "does not list this checkpoint"}
    guarantee = ledger.get("guarantee", {})
    return {"epsilon": guarantee.get("epsilon"), "delta": guarantee.get("delta"), "ledger": "verified"}
