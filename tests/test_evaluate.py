"""The evaluation suite: the report of a tiny run, the metric functions, the CLI's errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import tiny_config

from fedpggan.cli import main
from fedpggan.data import open_dataset
from fedpggan.errors import FedPGGANError
from fedpggan.evaluation import (ClassifierPrivacy, TrainingBudget, class_diversity, classification_scores,
                                 embed, evaluate_classifier, frechet_distance, label_fidelity, memorisation,
                                 nearest_distance, prdc_scores, scores_over_seeds, synthetic_set, train_classifier,
                                 trtr)
from fedpggan.evaluation import dcr
from fedpggan.evaluation.report import markdown
from fedpggan.io import sha256_file
from fedpggan.train import train_centralised
from pggan_model import gan_from_checkpoint

TINY = ["--n-synthetic", "200", "--steps", "20", "--seeds", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # large D batches and few G steps: one epoch of the tiniest GAN, for its checkpoint only
    return train_centralised(tiny_config(tmp_path_factory.mktemp("eval") / "run", batch_size=128, d_steps=5))


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["evaluate", str(run_dir), *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def phantom():
    return {split: open_dataset("phantom", split) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def judge(phantom):
    """A classifier trained on real phantom images, and its TRTR scores."""
    summary, models = scores_over_seeds(lambda _: (phantom["train"].images, phantom["train"].labels),
                                        phantom["test"], 1, TrainingBudget(steps=80, batch_size=64), progress=False)
    return models[0], summary


def reject_nan(token):
    raise AssertionError(f"evaluation.json holds {token}: not valid JSON")


def test_report_files_and_keys(report, run_dir, capsys):
    result = json.loads((report / "evaluation.json").read_text(), parse_constant=reject_nan)
    for key in ("tstr", "trtr", "fid", "prdc", "label_fidelity", "diversity", "memorisation", "checkpoint",
                "epsilon", "dataset", "device", "settings"):
        assert key in result, key
    for kind in ("tstr", "trtr"):
        auc = result[kind]["auc"]
        assert len(auc["per_seed"]) == 2 and all(0 <= a <= 1 for a in auc["per_seed"])
        assert auc["mean"] == pytest.approx(np.mean(auc["per_seed"]))
        assert auc["std"] == pytest.approx(np.std(auc["per_seed"], ddof=1))
        assert len(result[kind]["per_class_recall"]["mean"]) == 2 and 0 <= result[kind]["accuracy"]["mean"] <= 1
    assert set(result["prdc"]) == {"precision", "recall", "density", "coverage"} and result["fid"] >= 0
    assert result["checkpoint"]["file"] == "ckpt_00001.pt" and result["epsilon"] is None  # a no-DP run
    assert result["dataset"]["n_train"] == 2000 and result["settings"]["n_synthetic"] == 200
    assert result["settings"]["seeds"] == [0, 1] and result["device"] == "cpu"
    assert 0 <= result["memorisation"]["synthetic"]["share_closer_to_train"] <= 1
    md = (report / "EVALUATION.md").read_text()
    assert "| ROC AUC |" in md and "Memorisation" in md and "no lesion" in md
    # 200 images and 2 seeds are short of the report's size: the markdown says so at the top, and only then
    assert "**Quick evaluation** (a smoke check: 200 synthetic images (report: 5000), 2 seed(s) (report: 3)" in md
    full = {**result, "settings": {**result["settings"], "quick": False, "short_of_report": []}}
    assert "Quick evaluation" not in markdown(full)
    assert (report / "evaluation_grid.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / "evaluation.json").exists()  # --out was honoured


def test_a_one_class_dataset_trains_with_a_warning_and_its_utility_is_reported_as_trivial(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "one.npz"
    np.savez(npz, **{f"{s}_images": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")},
             **{f"{s}_labels": np.zeros((40, 1), dtype=np.uint8) for s in ("train", "val", "test")})
    run = train_centralised(tiny_config(tmp_path / "run", dataset=str(npz)))
    assert "has one class (class_0)" in capsys.readouterr().err
    assert main(["evaluate", str(run), *TINY, "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "EVALUATION.md").read_text()
    assert "| ROC AUC | n/a | n/a |" in md and "One class: a classifier has nothing to tell apart" in md


def test_settings_can_be_compared_on_the_val_split_without_touching_test(run_dir, phantom, tmp_path, monkeypatch):
    from fedpggan.evaluation import suite

    opened, real_open = [], suite.open_real
    monkeypatch.setattr(suite, "open_real", lambda spec, split, *a: opened.append(split) or real_open(spec, split, *a))
    out = tmp_path / "val"
    assert main(["evaluate", str(run_dir), *TINY, "--split", "val", "--out", str(out)]) == 0
    assert opened == ["train", "val"]
    result = json.loads((out / "evaluation.json").read_text())
    assert result["dataset"]["split"] == "val" and result["dataset"]["n_test"] == len(phantom["val"])
    assert f"/ {len(phantom['val'])} val)" in (out / "EVALUATION.md").read_text()


def test_synthetic_sets_are_balanced_and_reproducible(run_dir):
    gan, _ = gan_from_checkpoint(run_dir / "checkpoints" / "ckpt_00001.pt")
    a, labels = synthetic_set(gan, 51, "both", seed=3)
    b, _ = synthetic_set(gan, 51, "both", seed=3)
    assert torch.equal(a, b) and not torch.equal(a, synthetic_set(gan, 51, "both", seed=4)[0])
    assert a.shape == (51, 1, 28, 28) and torch.bincount(labels).tolist() == [26, 25]


def test_the_fidelity_set_follows_the_real_test_splits_class_mix(run_dir):
    """FID, PRDC, label fidelity and the memorisation baseline compare with real images: a balanced
    set against PneumoniaMNIST's 234 / 390 test split measured the mix (FID 0.89 -> 2.34 for real images)."""
    from fedpggan.evaluation.utility import mixed_labels

    labels = mixed_labels(5000, [234, 390], seed=0)
    assert torch.bincount(labels).tolist() == [1875, 3125]
    assert torch.bincount(labels[:2500], minlength=2).min() > 800  # each generator's half holds both classes
    assert torch.bincount(mixed_labels(7, [1, 1, 1], seed=1)).tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    gan, _ = gan_from_checkpoint(run_dir / "checkpoints" / "ckpt_00001.pt")
    _, labels = synthetic_set(gan, 100, "both", seed=3, class_mix=[30, 70])
    assert torch.bincount(labels).tolist() == [30, 70]


def test_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    def error_of(*argv: str) -> str:
        assert main(["evaluate", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    assert "no such run folder" in error_of(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run_dir / "run.json", empty / "run.json")
    assert "no checkpoints found" in error_of(str(empty))
    npz = tmp_path / "three.npz"   # 3 classes: the run's generators make 2
    rng = np.random.default_rng(0)
    np.savez(npz, **{f"{s}_images": rng.integers(0, 256, (9, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")},
             **{f"{s}_labels": (np.arange(9) % 3)[:, None] for s in ("train", "val", "test")})
    assert "3 classes" in error_of(str(run_dir), "--real", str(npz), *TINY)
    folder = tmp_path / "site_folder"  # one site's own images (label skew): no training image of one class
    for split, classes in (("train", ("no lesion",)), ("test", ("no lesion", "lesion"))):
        for name in ("no lesion", "lesion"):
            (folder / split / name).mkdir(parents=True)
        for name in classes:
            for i in range(6):
                Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / split / name / f"{i}.png")
    assert ("class 'lesion' has no training images (read: .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp); pass --real "
            "data that hold every class") in error_of(str(run_dir), "--real", str(folder), *TINY)
    assert "--seeds 0" in error_of(str(run_dir), "--seeds", "0")
    assert "--n-synthetic 3: PRDC's 5 nearest neighbours need more" in error_of(str(run_dir), "--n-synthetic", "3")
    assert "--checkpoint 7: no such checkpoint file or round" in error_of(str(run_dir), "--checkpoint", "7")
    assert "--checkpoint ²: no such checkpoint file or round" in error_of(str(run_dir), "--checkpoint", "²")  # a digit to str.isdigit


def test_checkpoint_is_a_file_or_a_round_as_for_export(run_dir, tmp_path):
    for spec in ("1", str(run_dir / "checkpoints" / "ckpt_00001.pt")):
        out = tmp_path / spec.replace("/", "_")
        assert main(["evaluate", str(run_dir), "--n-synthetic", "40", "--steps", "2", "--seeds", "1", "--device", "cpu",
                     "--checkpoint", spec, "--out", str(out)]) == 0
        assert json.loads((out / "evaluation.json").read_text())["checkpoint"]["file"] == "ckpt_00001.pt"


def test_trtr_on_phantom_is_near_perfect(judge):
    assert judge[1]["auc"]["mean"] > 0.9


def test_label_fidelity_follows_the_requested_labels(judge, phantom):
    images, labels = phantom["train"].images[:400], phantom["train"].labels[:400]
    right = label_fidelity(judge[0], images, labels)
    wrong = label_fidelity(judge[0], images, 1 - labels)
    assert right["overall"] > 0.9 and right["overall"] + wrong["overall"] == pytest.approx(1.0)
    assert len(right["per_class"]) == 2


def test_collapsed_class_is_flagged(judge, phantom):
    test = phantom["test"]
    fake = test.images.clone()
    fake[test.labels == 0] = test.images[test.labels == 0][0]   # every class-0 image the same
    _, real_f = embed(judge[0], test.images)
    _, fake_f = embed(judge[0], fake)
    div = class_diversity(real_f, test.labels.numpy(), fake_f, test.labels.numpy(), test.class_names)
    assert div["collapsed"] == [test.class_names[0]]
    assert div["ratio"][0] == pytest.approx(0.0, abs=1e-6) and div["ratio"][1] == pytest.approx(1.0)


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # a pure mean shift adds exactly its squared length
    assert frechet_distance(x, x + 0.5) == pytest.approx(8 * 0.25, rel=1e-4)
    assert frechet_distance(x, x + 2.0) > frechet_distance(x, x + 0.5)


def test_prdc_identical_sets_and_disjoint_sets():
    x = np.random.default_rng(0).normal(size=(200, 8))
    same = prdc_scores(x, x.copy())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc_scores(x, x + 100.0)
    assert far["precision"] == far["recall"] == far["coverage"] == 0.0


def test_memorisation_detects_copies_of_training_images(phantom):
    train = phantom["train"].images[:200]   # as large as the test reference half: baseline ~0.5
    test = phantom["test"].images
    copied = memorisation(train, train, test)
    fresh = memorisation(phantom["val"].images[:200], train, test)
    assert copied["synthetic"]["share_closer_to_train"] == 1.0
    assert copied["synthetic"]["dcr_train_p5"] < 0.05 and copied["dcr_train_p5_ratio"] < 0.05
    assert fresh["synthetic"]["share_closer_to_train"] < 0.8 and abs(fresh["excess_share"]) < 0.2
    assert copied["excess_share"] > 0.3 and copied["synthetic"]["dcr_ratio_median"] < 0.01
    assert 0.5 < fresh["synthetic"]["dcr_ratio_median"] < 1.5


def test_nearest_distance_chunks_agree_with_brute_force(monkeypatch):
    rng = torch.Generator().manual_seed(0)
    q, r = torch.randn(23, 1, 4, 4, generator=rng), torch.randn(31, 1, 4, 4, generator=rng)
    monkeypatch.setattr(dcr, "QUERY_CHUNK", 5)
    monkeypatch.setattr(dcr, "REFERENCE_CHUNK", 7)
    expected = torch.cdist(q.flatten(1), r.flatten(1)).min(1).values
    assert torch.allclose(nearest_distance(q, r), expected, atol=1e-5)


def test_classification_scores():
    labels = np.array([0, 1, 2, 2])
    perfect = np.eye(3)[labels]
    assert classification_scores(perfect, labels) == {"accuracy": 1.0, "auc": 1.0, "per_class_recall": [1.0] * 3}
    flipped = classification_scores(np.eye(2)[1 - labels[:2]], labels[:2])
    assert flipped["auc"] == 0.0 and flipped["accuracy"] == 0.0
    missing = classification_scores(np.eye(3)[[0, 0, 2]], np.array([0, 0, 2]))
    assert math.isnan(missing["per_class_recall"][1]) and missing["auc"] == 1.0


def test_classifier_training_is_deterministic_and_leaves_rng_alone(phantom):
    images, labels = phantom["train"].images[:256], phantom["train"].labels[:256]
    budget = TrainingBudget(steps=3, batch_size=32)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = train_classifier(images, labels, 2, budget, seed=7, progress=False)
    assert torch.rand(1) == expected
    b = train_classifier(images, labels, 2, budget, seed=7, progress=False)
    c = train_classifier(images, labels, 2, budget, seed=8, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


def test_dp_sgd_classifier_meets_its_budget(phantom):
    train, test = phantom["train"], phantom["test"]
    model = train_classifier(train.images, train.labels, 2, TrainingBudget(steps=4, batch_size=64),
                             privacy=ClassifierPrivacy(epsilon=2.0, accountant="rdp"), progress=False)
    info = model.training_info
    assert info["dp"] and info["noise_multiplier"] > 0 and 0 < info["epsilon"] <= 2.0 * 1.02
    assert info["delta"] == pytest.approx(min(1e-5, 1 / (10 * len(train))))
    assert 0 <= evaluate_classifier(model, test.images, test.labels)["auc"] <= 1
    model(test.images[:4]).sum().backward()   # Opacus' hooks are gone: a plain module again
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    summary = trtr(train, test, seeds=1, budget=TrainingBudget(steps=3, batch_size=64),
                   privacy=ClassifierPrivacy(epsilon=1.0, accountant="rdp"), progress=False)
    assert summary["privacy"]["epsilon"] <= 1.02 and 0 <= summary["auc"]["mean"] <= 1


def test_a_classifier_budget_in_epochs_is_judged_by_the_steps_it_makes():
    from fedpggan.evaluation.classifier import TrainingBudget
    from fedpggan.evaluation.suite import smaller_than_report

    assert smaller_than_report(5000, 3, TrainingBudget(epochs=0.01))["quick"]  # 1 step on 5000 images
    assert not smaller_than_report(5000, 3, TrainingBudget(epochs=20))["quick"]  # 782 steps


def test_a_run_whose_ledger_is_missing_is_not_reported_as_without_dp(run_dir, tmp_path):
    from fedpggan.evaluation.report import privacy_unknown
    from fedpggan.evaluation.suite import ledger_guarantee
    from fedpggan.runs import RunFolder

    listed = sha256_file(run_dir / "checkpoints" / "ckpt_00001.pt")
    assert ledger_guarantee(RunFolder(run_dir), listed)["ledger"] == "verified"
    # a .pt from elsewhere (--checkpoint FILE) is not what the ledger's guarantee covers
    assert privacy_unknown(ledger_guarantee(RunFolder(run_dir), "0" * 64)) == "unknown (privacy ledger does not list this checkpoint)"
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "privacy_ledger.json").unlink()
    guarantee = ledger_guarantee(RunFolder(run), listed)
    assert guarantee["epsilon"] is None and privacy_unknown(guarantee) == \
        "unknown (privacy ledger missing, or not the one run.json records)"


def test_a_deployed_run_is_evaluated_on_the_data_its_sites_named_or_needs_real():
    from fedpggan.evaluation.suite import real_dataset_spec

    deployed = {"config": {"dataset": "auto"}, "dataset": {"name": "breastmnist", "is_medical": True}}
    assert real_dataset_spec(deployed, None, None) == ("breastmnist", None)  # not PneumoniaMNIST because it is medical
    assert real_dataset_spec({**deployed, "dataset": {"name": "phantom (not medical data)"}}, None, None)[0] == "phantom"
    with pytest.raises(FedPGGANError, match="sites trained on their own data.*give --real"):
        real_dataset_spec({**deployed, "dataset": {"name": "site data", "is_medical": True}}, None, None)
    assert real_dataset_spec({**deployed, "dataset": {"name": "site data"}}, "/data/test", "d") == ("/data/test", "d")


def test_a_run_resumed_from_moved_data_is_evaluated_and_audited_where_the_data_are_now():
    from fedpggan.audit.mia_data import run_data_config
    from fedpggan.evaluation.suite import real_dataset_spec

    moved = {"kind": "federated", "config": {"dataset": "pneumoniamnist", "data-dir": "/old/data", "image-size": 28},
             "resumed_with": {"data-dir": "/new/data"}}  # what a resume with --data-dir /new/data records
    assert real_dataset_spec(moved, None, None) == ("pneumoniamnist", "/new/data")
    assert run_data_config(moved, None).data_dir == "/new/data"
    assert real_dataset_spec(moved, None, "/given") == ("pneumoniamnist", "/given")  # --data-dir still wins


def test_real_data_are_read_with_the_runs_class_ids_by_name(phantom):
    test = phantom["test"]
    trained = test.class_names[::-1]  # an ImageFolder numbers its classes alphabetically, a MedMNIST file by id
    mapped = test.in_class_order(trained, "--real")
    assert mapped.class_names == trained
    assert torch.equal(mapped.labels, test.num_classes - 1 - test.labels) and torch.equal(mapped.images, test.images)
    assert test.in_class_order(["class_0", "class_1"], "--real") is test  # generic names: the ids decide
    with pytest.raises(FedPGGANError, match=r"--real phantom: classes .* but the run was trained on \['benign', 'malignant'\]"):
        test.in_class_order(["benign", "malignant"], "--real")


def test_a_quick_or_val_evaluation_does_not_replace_the_full_report_export_publishes(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "evaluation.json").write_text(json.dumps({"dataset": {"split": "test"}, "settings": {"quick": False}}))
    before = (run / "evaluation.json").read_bytes()
    for extra in ([], ["--split", "val"]):  # TINY is quick
        assert main(["evaluate", str(run), *TINY, *extra]) == 2
        assert "holds a full test-split evaluation" in capsys.readouterr().err
    assert (run / "evaluation.json").read_bytes() == before
    for out in (run, f"{run}/", run / ".." / run.name):  # naming the run folder as --out is no way round it
        assert main(["evaluate", str(run), *TINY, "--out", str(out)]) == 2
        assert "holds a full test-split evaluation" in capsys.readouterr().err
    assert (run / "evaluation.json").read_bytes() == before
    (run / "evaluation.json").write_text(json.dumps({"dataset": {"split": "test"}, "settings": {"quick": True}}))
    assert main(["evaluate", str(run), "--n-synthetic", "40", "--steps", "2", "--seeds", "1", "--device", "cpu"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["settings"]["prdc_images_per_side"] == 40  # min(40, test)


def test_classes_a_tstr_classifier_misses_are_named_with_the_remedy_measured_for_them():
    from fedpggan.evaluation.report import unlearned_classes

    result = {"dataset": {"class_names": ["a", "b", "c"]}, "tstr": {"per_class_recall": {"mean": [0.05, 0.9, 0.02]}},
              "epsilon": 9.99, "run_g_steps": 2}
    lines = unlearned_classes(result)
    assert "**Classes not learned:** a, c (TSTR recall below 10%)" in lines[-1] and "`--g-steps 8`" in lines[-1]
    assert "--g-steps" not in unlearned_classes({**result, "epsilon": 1.0})[-1]  # at epsilon 1 more steps learn D's noise
    assert "--g-steps" not in unlearned_classes({**result, "run_g_steps": 8})[-1]
    # a run that recorded its discriminator's noise is judged by it, whatever its epsilon
    assert "--g-steps" not in unlearned_classes({**result, "run_d_noise": 0.043})[-1]  # BreastMNIST's at epsilon 10
    assert "--g-steps 0" in unlearned_classes({**result, "epsilon": 1.0, "run_d_noise": 0.005})[-1]  # large sites
    assert unlearned_classes({**result, "tstr": {"per_class_recall": {"mean": [0.5, 0.9, 0.2]}}}) == []


def test_a_report_is_not_written_into_another_runs_folder_nor_into_an_export(run_dir, tmp_path, capsys):
    """Another run's report would be replaced (and its export would quote this run's figures); an
    export is published as it is, and the evaluation holds TRTR figures and real images."""
    other, export = tmp_path / "other", tmp_path / "export"
    shutil.copytree(run_dir, other)
    export.mkdir()
    (export / "datasheet.json").write_text("{}")
    before = {f: f.read_bytes() for f in (*other.iterdir(), *export.iterdir()) if f.is_file()}
    for command in (["evaluate", str(run_dir), *TINY], ["audit", str(run_dir)]):
        assert main([*command, "--out", str(other)]) == 2
        assert f"--out {other}: is another run's folder (it holds run.json)" in capsys.readouterr().err
        assert main([*command, "--out", str(export)]) == 2
        assert f"--out {export}: is an export (it holds datasheet.json)" in capsys.readouterr().err
        assert main([*command, "--out", str(export / "reports")]) == 2
        assert f"--out {export / 'reports'}: is inside the export {export} (it holds datasheet.json)" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in (*other.iterdir(), *export.iterdir()) if f.is_file()} == before


def test_export_refuses_an_evaluation_of_another_run(report, run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    evaluation = json.loads((report / "evaluation.json").read_text())
    assert evaluation["run_id"] == json.loads((run_dir / "run.json").read_text())["run_id"]
    (run / "evaluation.json").write_text(json.dumps({**evaluation, "run_id": "another-run"}))
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--n", "20", "--allow-unaudited", "--allow-no-dp"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.json: evaluates run another-run, not this run" in err and not (tmp_path / "x").exists()
