"""``fedpggan export``: layout, determinism, privacy gates, all-or-nothing output, bounded memory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedpggan.audit.runner import audited_content
from fedpggan.cli import main
from fedpggan.config import RunConfig
from fedpggan.data import open_dataset, open_phantom
from fedpggan.data.sources import run_dataset_name
from fedpggan.errors import FedPGGANError
from fedpggan.export import ExportOptions, export_run, exporter
from fedpggan.export.imagefolder import ImageFolderWriter, class_folders
from fedpggan.export.options import apportion, parse_split
from fedpggan.io import sha256_file
from fedpggan.runs import RunFolder
from fedpggan.train import train_centralised

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_on_synthetic.py"
def write_audit(run: Path, passed: bool, date: str = "2026-01-02T03:04:05+00:00", where: Path | None = None,
                sites: dict | None = None) -> None:
    """An audit.json verdict on the run's current content, as `fedpggan audit` writes it."""
    folder = RunFolder(run)
    content = audited_content(folder, folder.read_run())
    report = {"passed": passed, "date": date, "content": content, **({"sites": sites} if sites else {})}
    ((where or run) / "audit.json").write_text(json.dumps(report))


def phantom_npz(path: Path, channels: int, seed: int) -> Path:
    """A small MedMNIST-layout npz of phantom images (uint8, labels (N,1))."""
    arrays = {}
    for split, n in (("train", 64), ("val", 16), ("test", 64)):
        data = open_phantom(split, n=n, channels=channels, seed=seed)
        pixels = ((data.images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        arrays[f"{split}_images"] = pixels[..., 0] if channels == 1 else pixels
        arrays[f"{split}_labels"] = data.labels.numpy().astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory) -> Path:
    """A DP run on grayscale phantom images with a passing audit. A small npz and q = 1/8 keep
    DP training and noise calibration to seconds; run.json is then marked not medical, as a
    run on the built-in 'phantom' dataset is."""
    root = tmp_path_factory.mktemp("gray")
    data = phantom_npz(root / "phantom.npz", channels=1, seed=0)
    train_centralised(RunConfig(dataset=str(data), epochs=1, g_width=16, d_width=8, batch_size=8, d_steps=2,
                                g_batch_size=16, epsilon=2, accountant="rdp", out=str(root / "run")))
    folder = RunFolder(root / "run")
    run = folder.read_run()
    run["dataset"].update(name=run_dataset_name("phantom", is_medical=False), is_medical=False,
                          class_names=open_phantom("test", n=2).class_names)
    folder.write_run(run)
    write_audit(folder.root, passed=True, sites={"central": {"replace_one_epsilon": 3.25}})
    return folder.root


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> Path:
    """An RGB run without DP and without an audit."""
    root = tmp_path_factory.mktemp("rgb")
    data = phantom_npz(root / "rgb_phantom.npz", channels=3, seed=1)
    train_centralised(RunConfig(dataset=str(data), epochs=1, g_width=16, d_width=8, batch_size=32, d_steps=2,
                                g_batch_size=16, epsilon=math.inf, out=str(root / "run")))
    return root / "run"


def cli(*argv: object) -> int:
    return main(["export", *map(str, argv)])


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def edit_ledger(run: Path, change, rehash: bool = True) -> None:
    """Change the ledger; ``rehash`` re-records its hash in run.json as a real run would."""
    folder = RunFolder(run)
    ledger = folder.read_json(folder.ledger_json)
    change(ledger)
    folder.ledger_json.write_text(json.dumps(ledger))
    if rehash:
        folder.write_run(folder.read_run())


def test_200_image_export_is_complete_reproducible_and_refuses_a_full_folder(gray_run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(gray_run, "--out", a, "--n", 200) == 0
    assert cli(gray_run, "--out", b, "--n", 200) == 0
    assert (a / "synthetic.npz").read_bytes() == (b / "synthetic.npz").read_bytes()
    assert png_bytes(a) == png_bytes(b) and len(png_bytes(a)) == 200

    with np.load(a / "synthetic.npz") as npz:
        assert sorted(npz.files) == ["train_images", "train_labels"]
        images, labels = npz["train_images"], npz["train_labels"]
    assert images.dtype == np.uint8 and images.shape == (200, 28, 28)
    assert labels.dtype == np.uint8 and labels.shape == (200, 1)
    assert np.bincount(labels[:, 0]).tolist() == [100, 100]
    assert sorted(p.name for p in (a / "images").iterdir()) == ["0_no_lesion", "1_lesion"]
    for png in sorted((a / "images").rglob("*.png"))[::23]:   # file name = npz row, folder = label
        row = int(png.stem)
        assert np.array_equal(np.asarray(Image.open(png)), images[row])
        assert labels[row, 0] == int(png.parent.name.split("_")[0])
    loaded = open_dataset(str(a / "synthetic.npz"), "train")
    assert len(loaded) == 200 and loaded.channels == 1 and loaded.class_counts() == [100, 100]

    run = json.loads((gray_run / "run.json").read_text())
    ledger = json.loads((gray_run / "privacy_ledger.json").read_text())
    sheet = json.loads((a / "datasheet.json").read_text())
    eps = ledger["guarantee"]["epsilon"]
    assert sheet["privacy"]["guarantee"]["epsilon"] == eps and sheet["privacy"]["accountants"] == ["rdp"]
    assert sheet["privacy"]["sites"]["central"]["budget_epsilon"] == 2
    canonical = json.dumps(run["config"], sort_keys=True, separators=(",", ":")).encode()
    assert sheet["source_run"]["config_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert sheet["source_run"]["num_sites"] == 1
    assert sheet["generator"]["sha256"] == ledger["checkpoints"][-1]["sha256"]
    assert sheet["audit"] == {"status": "passed", "date": "2026-01-02T03:04:05+00:00",
                              "report": "audit.json", "reason": None}
    assert sheet["privacy"]["sites"]["central"]["replace_one_epsilon"] == 3.25  # the audit's, per site
    assert sheet["export"]["class_counts"] == {"no lesion": 100, "lesion": 100}
    assert sheet["export"]["generator_counts"] == {"G1": 100, "G2": 100}
    assert sheet["export"]["files"]["synthetic.npz"] == sha256_file(a / "synthetic.npz")
    assert sheet["quality"] is None and sheet["versions"]["torch"]
    assert sheet["dataset"]["name"] == "phantom" and sheet["title"].endswith("(phantom)")  # its public name, unmarked
    markdown = (a / "DATASHEET.md").read_text()
    assert "NOT MEDICAL DATA" in markdown and f"{eps:.4g}" in markdown and "not for diagnosis" in markdown.lower()
    assert "UNAUDITED" not in markdown
    assert "-DP per record (add/remove adjacency), accountant rdp; under replace-one adjacency epsilon 3.25 (audit)" in markdown

    capsys.readouterr()
    assert cli(gray_run, "--out", a, "--n", 10) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert png_bytes(a) == png_bytes(b)


def test_the_same_images_whatever_the_chunk_size_and_new_images_for_a_new_seed(gray_run, tmp_path):
    """Each image keeps its latent whatever the chunk size; only float rounding, which a batch's size may
    change in the last bit before the conversion to 0..255, can move a pixel, by one grey level."""
    def train_images(name: str, **kw) -> np.ndarray:
        export_run(gray_run, tmp_path / name, ExportOptions(n=120, formats=("npz",), **kw))
        with np.load(tmp_path / name / "synthetic.npz") as npz:
            return npz["train_images"]

    base = train_images("base")
    difference = np.abs(train_images("chunked", chunk_size=37).astype(int) - base)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert not np.array_equal(train_images("seed1", seed=1), base)


def test_split_per_class_counts_and_imagefolder_layout(gray_run, tmp_path):
    from torchvision.datasets import ImageFolder

    out = tmp_path / "split"
    sheet = export_run(gray_run, out, ExportOptions(per_class=(40, 20), split=parse_split("0.5/0.25/0.25")))
    expected = {"train": [20, 10], "val": [10, 5], "test": [10, 5]}
    with np.load(out / "synthetic.npz") as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in expected for k in ("images", "labels"))
        for split, counts in expected.items():
            assert npz[f"{split}_images"].shape == (sum(counts), 28, 28)
            assert np.bincount(npz[f"{split}_labels"][:, 0]).tolist() == counts
    folders = class_folders(["no lesion", "lesion"])
    for split, counts in expected.items():
        assert [len(list((out / "images" / split / f).iterdir())) for f in folders] == counts
    folder = ImageFolder(str(out / "images" / "train"))
    assert folder.class_to_idx == {"0_no_lesion": 0, "1_lesion": 1} and len(folder) == 30
    assert open_dataset(str(out / "synthetic.npz"), "test").class_counts() == [10, 5]
    assert sheet["export"]["split_counts"]["val"] == {"no lesion": 10, "lesion": 5}
    with pytest.raises(FedPGGANError, match="the val split would hold no image of some class"):  # 2 x 0.1 rounds to 0
        export_run(gray_run, tmp_path / "tiny", ExportOptions(per_class=(8, 2), split=parse_split("0.8/0.1/0.1")))
    assert not (tmp_path / "tiny").exists()


def test_class_prior_file_and_single_generator(gray_run, tmp_path):
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"lesion": 3, "no lesion": 1}))   # keyed by name, in any order
    sheet = export_run(gray_run, tmp_path / "o", ExportOptions(n=101, class_prior=str(prior), generator="2",
                                                               formats=("npz",)))
    assert sheet["export"]["class_counts"] == {"no lesion": 25, "lesion": 76}
    assert sheet["export"]["generator_counts"] == {"G1": 0, "G2": 101}
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3")
    with pytest.raises(FedPGGANError, match="3 weights"):
        export_run(gray_run, tmp_path / "bad", ExportOptions(n=10, class_prior=str(bad)))
    with pytest.raises(FedPGGANError, match="no such file"):
        export_run(gray_run, tmp_path / "bad", ExportOptions(n=10, class_prior=str(tmp_path / "missing.json")))
    assert not (tmp_path / "bad").exists()


def test_rgb_run_layout_resampling_and_no_dp_gate(rgb_run, tmp_path):
    with pytest.raises(FedPGGANError, match="WITHOUT differential privacy"):
        export_run(rgb_run, tmp_path / "refused", ExportOptions(n=20, allow_unaudited=True))
    out = tmp_path / "rgb"
    sheet = export_run(rgb_run, out, ExportOptions(n=20, image_size=32, allow_unaudited=True, allow_no_dp=True))
    with np.load(out / "synthetic.npz") as npz:
        assert npz["train_images"].dtype == np.uint8 and npz["train_images"].shape == (20, 32, 32, 3)
        assert npz["train_labels"].shape == (20, 1)
    png = next((out / "images").rglob("*.png"))
    assert Image.open(png).mode == "RGB" and Image.open(png).size == (32, 32)
    assert open_dataset(str(out / "synthetic.npz")).channels == 3
    assert sheet["export"]["resampled_from"] == 28 and not sheet["privacy"]["dp"]
    markdown = (out / "DATASHEET.md").read_text()
    assert "NO PRIVACY GUARANTEE" in markdown and "UNAUDITED" in markdown and "NOT MEDICAL DATA" not in markdown


def test_a_run_without_dp_is_refused_once_naming_every_flag_and_the_datasheet_says_what_was_promised(
        rgb_run, tmp_path, capsys):
    run = copy_run(rgb_run, tmp_path)
    for given, needed, says in (((), "--allow-no-dp --allow-unaudited", "NO PRIVACY GUARANTEE and UNAUDITED"),
                                (("--allow-no-dp",), "pass --allow-unaudited (", "NO PRIVACY GUARANTEE and UNAUDITED")):
        assert cli(run, "--out", tmp_path / "refused", "--n", 10, *given) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "can never pass `fedpggan audit`" in err and needed in err
        assert f"(the datasheet will say {says})" in err and "fix the run" not in err
    assert main(["audit", str(run)]) == 1  # audited now: it fails, as a run without DP must
    capsys.readouterr()
    assert cli(run, "--out", tmp_path / "refused", "--n", 10, "--allow-no-dp") == 2
    assert "(the datasheet will say NO PRIVACY GUARANTEE and AUDIT FAILED)" in capsys.readouterr().err
    assert cli(run, "--out", tmp_path / "o", "--n", 10, "--allow-no-dp", "--allow-unaudited") == 0
    markdown = (tmp_path / "o" / "DATASHEET.md").read_text()
    assert "NO PRIVACY GUARANTEE" in markdown and "AUDIT FAILED (" in markdown and "UNAUDITED" not in markdown
    assert "dp: the ledger records no differential privacy" in markdown


def test_a_failed_audit_is_refused_with_its_violation_and_exported_as_audit_failed(tmp_path, capsys):
    """A run whose noise came from --seed fails the audit: retraining, not 'fixing the run', is the way."""
    data = phantom_npz(tmp_path / "phantom.npz", channels=1, seed=0)
    run = tmp_path / "seeded"
    train_centralised(RunConfig(dataset=str(data), epochs=1, g_width=16, d_width=8, batch_size=8, d_steps=2,
                                g_batch_size=16, epsilon=2, accountant="rdp", noise_key="seed", out=str(run)))
    assert main(["audit", str(run)]) == 1
    capsys.readouterr()
    assert cli(run, "--out", tmp_path / "refused", "--n", 10) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "says the audit FAILED" in err and "retrain with --noise-key secret" in err
    assert err.strip().endswith("or pass --allow-unaudited to export anyway (the datasheet will say AUDIT FAILED)")
    assert cli(run, "--out", tmp_path / "o", "--n", 10, "--allow-unaudited") == 0
    sheet = json.loads((tmp_path / "o" / "datasheet.json").read_text())
    assert sheet["audit"]["status"] == "failed" and any("AUDIT FAILED" in w and "--noise-key secret" in w
                                                        for w in sheet["warnings"])
    assert "UNAUDITED" not in (tmp_path / "o" / "DATASHEET.md").read_text()


def _edit_run(run, change):
    folder = RunFolder(run)
    info = folder.read_run()
    change(info)
    folder.write_run(info)


def _bump(ledger, eps):
    ledger["sites"]["central"]["epsilon"] = ledger["guarantee"]["epsilon"] = eps


REFUSALS = {
    "missing ledger": (lambda run: (run / "privacy_ledger.json").unlink(), "missing"),
    "tampered ledger": (lambda run: edit_ledger(run, lambda led: _bump(led, 1.0), rehash=False), "tampered"),
    "over budget": (lambda run: edit_ledger(run, lambda led: _bump(led, 12.0)), "over its budget"),
    "guarantee not the max": (lambda run: edit_ledger(run, lambda led: led["guarantee"].update(epsilon=1.0)),
                              "not the maximum"),
    "checkpoint not in ledger": (lambda run: edit_ledger(run, lambda led: led.update(checkpoints=[])), "lists none of its checkpoints"),
    "unaudited": (lambda run: (run / "audit.json").unlink(), "audit.json: is missing"),
    "failed audit": (lambda run: write_audit(run, passed=False, date="2026-01-01"), "FAILED"),
    "audit of an older content": (lambda run: edit_ledger(run, lambda led: led["assumptions"].append("edited")),
                                  "audited other content than this run's ledger, options and description now"),
    "run described otherwise since the audit": (lambda run: _edit_run(run, lambda info: info["dataset"].update(is_medical=True)),
                                                "audited other content than this run's ledger, options and description now"),
    "audit without content hashes": (lambda run: (run / "audit.json").write_text('{"passed": true, "date": "x"}'),
                                     "records no content hashes"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_runs_whose_privacy_cannot_be_vouched_for(gray_run, tmp_path, capsys, case):
    spoil, message = REFUSALS[case]
    run = copy_run(gray_run, tmp_path)
    spoil(run)
    capsys.readouterr()
    assert cli(run, "--out", tmp_path / "out", "--n", 10) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_allow_unaudited_says_so_and_quality_figures_are_included(gray_run, tmp_path):
    run = copy_run(gray_run, tmp_path)
    write_audit(run, passed=False, date="2026-01-01")
    evaluation = {"created": "2026-01-01", "checkpoint": {"sha256": "another"}, "versions": {"torch": "x"},
                  "tstr": {"auc": {"mean": 0.812, "std": 0.01, "per_seed": [0.8, 0.82]}}, "fid": 41.5}
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    sheet = export_run(run, tmp_path / "o", ExportOptions(n=10, formats=("npz",), allow_unaudited=True))
    markdown = (tmp_path / "o" / "DATASHEET.md").read_text()
    assert sheet["audit"]["status"] == "failed" and "AUDIT FAILED (2026-01-01)" in markdown
    assert sheet["quality"]["figures"] == {"tstr.auc.mean": 0.812, "tstr.auc.std": 0.01}  # FID reads the training images
    assert "tstr.auc.mean: 0.812" in markdown and "DIFFERENT checkpoint" in markdown
    assert "> **QUALITY MEASURED ON ANOTHER CHECKPOINT" in markdown  # at the top, beside the other warnings
    assert "G1's rows come first, then G2's: shuffle before slicing" in markdown
    assert "LOW UTILITY" not in markdown
    assert "CLASSES NOT LEARNED" not in markdown  # no per-class recall recorded: nothing to judge
    evaluation["dataset"] = {"name": "phantom", "class_names": ["no lesion", "lesion"], "n_test": 400}
    evaluation["tstr"]["per_class_recall"] = {"mean": [0.04, 0.97]}  # a classifier trained on them misses class 0
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    export_run(run, tmp_path / "missed", ExportOptions(n=10, formats=("npz",), allow_unaudited=True))
    missed = (tmp_path / "missed" / "DATASHEET.md").read_text()
    assert "> **CLASSES NOT LEARNED: a classifier trained on these images recognises fewer than 10% of the real test " \
           "images of no lesion (TSTR recall)" in missed and "- recall per class: no lesion 0.04, lesion 0.97" in missed
    evaluation["tstr"]["auc"]["mean"] = 0.53  # near chance, as BreastMNIST at epsilon 1
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    export_run(run, tmp_path / "low", ExportOptions(n=10, formats=("npz",), allow_unaudited=True))
    assert "> **LOW UTILITY: a classifier trained on these images reaches a TSTR AUC of 0.53" in (
        tmp_path / "low" / "DATASHEET.md").read_text()


def test_an_audit_without_replace_one_figures_is_named_not_quoted(gray_run, tmp_path):
    """An audit made before the replace-one figure existed still vouches for the run; the datasheet
    says the figure is missing rather than quoting a partial maximum."""
    run = copy_run(gray_run, tmp_path)
    write_audit(run, passed=True)  # no per-site table
    sheet = export_run(run, tmp_path / "o", ExportOptions(n=10, formats=("npz",)))
    markdown = (tmp_path / "o" / "DATASHEET.md").read_text()
    assert sheet["privacy"]["sites"]["central"]["replace_one_epsilon"] is None
    assert "under replace-one adjacency: not in this audit for site(s) central (re-run `fedpggan audit`)" in markdown
    assert "| not in this audit: re-run `fedpggan audit` |" in markdown


def test_an_audit_written_with_out_is_used_through_audit_report(gray_run, tmp_path, capsys):
    """`fedpggan audit RUN --out REPORTS` leaves the run folder alone; export then takes the verdict
    from REPORTS, and only while it is a verdict on the run as it is now."""
    run = copy_run(gray_run, tmp_path)
    (run / "audit.json").unlink()
    reports = tmp_path / "reports"
    assert main(["audit", str(run), "--out", str(reports)]) == 0
    assert not (run / "audit.json").exists()
    capsys.readouterr()
    assert cli(run, "--out", tmp_path / "refused", "--n", 10) == 2
    assert "pass --audit-report DIR" in capsys.readouterr().err
    assert cli(run, "--out", tmp_path / "ok", "--n", 10, "--audit-report", reports) == 0
    sheet = json.loads((tmp_path / "ok" / "datasheet.json").read_text())
    assert sheet["audit"]["status"] == "passed" and sheet["audit"]["report"] == "audit.json"  # no path of the site's
    assert "--audit-report reports" in sheet["export"]["command"] and str(tmp_path) not in json.dumps(sheet)
    other = copy_run(gray_run, tmp_path / "other")  # another run's report is no verdict on this one
    edit_ledger(other, lambda led: led["assumptions"].append("another run"))
    capsys.readouterr()
    assert cli(other, "--out", tmp_path / "other-out", "--n", 10, "--audit-report", reports / "audit.json") == 2
    assert "audited other content" in capsys.readouterr().err
    assert cli(run, "--out", tmp_path / "x", "--n", 10, "--audit-report", tmp_path / "nowhere") == 2
    assert "--audit-report" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_quick_evaluation_reaches_the_datasheet_but_no_figure_read_from_the_training_images(gray_run, tmp_path):
    run = copy_run(gray_run, tmp_path)
    assert main(["evaluate", str(run), "--quick", "--device", "cpu"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["settings"]["quick"] is True and "1 seed(s) (report: 3)" in evaluation["settings"]["short_of_report"]
    assert cli(run, "--out", tmp_path / "o", "--n", 20) == 0
    sheet = json.loads((tmp_path / "o" / "datasheet.json").read_text())
    quality = sheet["quality"]
    assert quality["quick"] is True and quality["settings"]["seeds"] == [0] and quality["settings"]["n_synthetic"] == 1000
    assert quality["real_data"] == {"name": "phantom", "split": "test", "n_test": 64,
                                    "image_size": evaluation["dataset"]["image_size"]}
    assert not any(w.startswith("QUALITY MEASURED ON OTHER SETTINGS") for w in sheet["warnings"])
    assert any(w.startswith("QUICK EVALUATION") and "100 classifier steps on the synthetic set (report: 400)" in w
               for w in sheet["warnings"])
    markdown = (tmp_path / "o" / "DATASHEET.md").read_text()
    assert "> **QUICK EVALUATION" in markdown and "**QUICK evaluation**" in markdown
    assert "- real test data: phantom, 64 test images" in markdown
    # what the evaluation read from the training images is not published, nor where the real data lie
    assert {key.split(".")[0] for key in quality["figures"]} == {"tstr"}
    published = (tmp_path / "o" / "datasheet.json").read_text() + markdown
    assert evaluation["dataset"]["spec"] not in published and "trtr" not in published and "dcr" not in published
    assert "stay in the source run's EVALUATION.md" in markdown

    evaluation["diversity"]["collapsed"] = ["no lesion", "lesion"]   # as EVALUATION.md flags them
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    sheet = export_run(run, tmp_path / "again", ExportOptions(n=10, formats=("npz",)))
    assert "collapsed" not in json.dumps({k: v for k, v in sheet.items() if k != "export"}).lower()
    size = evaluation["dataset"]["image_size"]
    sheet = export_run(run, tmp_path / "other", ExportOptions(n=10, formats=("npz",), generator="1", image_size=2 * size))
    assert (f"QUALITY MEASURED ON OTHER SETTINGS: evaluated with generator both at {size} px; this export uses "
            f"generator 1 at {2 * size} px.") in sheet["warnings"]
    del evaluation["settings"]["generator"]  # an evaluation that did not record it: nothing to compare
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    sheet = export_run(run, tmp_path / "unknown", ExportOptions(n=10, formats=("npz",), generator="1"))
    assert not any(w.startswith("QUALITY MEASURED ON OTHER SETTINGS") for w in sheet["warnings"])
    assert not any(w.startswith("QUALITY MEASURED ON OTHER DATA") for w in sheet["warnings"])  # phantom on phantom
    evaluation["dataset"]["name"] = "breastmnist"  # `fedpggan evaluate --real breastmnist` of a phantom run
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    sheet = export_run(run, tmp_path / "other-data", ExportOptions(n=10, formats=("npz",)))
    assert ("QUALITY MEASURED ON OTHER DATA: evaluated on the breastmnist test split; the run was trained on "
            "phantom.") in sheet["warnings"]
    evaluation["dataset"]["name"] = "/hospital/xrays"  # a site's own folder: its name cannot be compared, nor shown
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    sheet = export_run(run, tmp_path / "site-data", ExportOptions(n=10, formats=("npz",)))
    assert not any(w.startswith("QUALITY MEASURED ON OTHER DATA") for w in sheet["warnings"])
    assert "/hospital" not in json.dumps(sheet)
    evaluation["dataset"]["split"] = "val"  # `fedpggan evaluate --split val`: figures for choosing settings
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    sheet = export_run(run, tmp_path / "val", ExportOptions(n=10, formats=("npz",)))
    assert any(w.startswith("QUALITY MEASURED ON THE VAL SPLIT") for w in sheet["warnings"])


def test_never_overwrites_the_run_folder(gray_run, tmp_path):
    with pytest.raises(FedPGGANError, match="run folder"):
        export_run(gray_run, gray_run, ExportOptions(n=10, overwrite=True))
    assert (gray_run / "privacy_ledger.json").is_file()


def test_overwrite_replaces_only_an_earlier_export(gray_run, rgb_run, tmp_path):
    other = copy_run(rgb_run, tmp_path)
    runs = tmp_path / "runs"  # a folder holding a run
    runs.mkdir()
    shutil.copytree(other, runs / "run-a")
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("years of work")
    for out, reason in ((other, "holds a training run"), (runs, "holds a training run"), (thesis, "not an earlier export"),
                        (gray_run / "checkpoints", "would replace the run folder")):
        before = sorted(p.name for p in out.rglob("*"))
        with pytest.raises(FedPGGANError, match=reason):
            export_run(gray_run, out, ExportOptions(n=10, overwrite=True))
        assert sorted(p.name for p in out.rglob("*")) == before
    export_run(gray_run, tmp_path / "export", ExportOptions(n=10))
    export_run(gray_run, tmp_path / "export", ExportOptions(n=12, overwrite=True))  # an export replaces an export
    assert len(np.load(tmp_path / "export" / "synthetic.npz")["train_labels"]) == 12
    # ...but not the files someone added beside it, nor any folder that merely has a datasheet.json
    (tmp_path / "export" / "NOTES.txt").write_text("my notes")
    lookalike = tmp_path / "project"
    (lookalike / "data").mkdir(parents=True)
    (lookalike / "datasheet.json").write_text("{}")
    for out, reason in ((tmp_path / "export", "holds NOTES.txt, which no export writes"), (lookalike, "not an earlier export")):
        before = sorted(p.name for p in out.rglob("*"))
        with pytest.raises(FedPGGANError, match=reason):
            export_run(gray_run, out, ExportOptions(n=10, overwrite=True))
        assert sorted(p.name for p in out.rglob("*")) == before


def test_the_datasheet_names_no_path_of_the_site(gray_run, tmp_path):
    """The datasheet travels with the data: a prior file's folder or the run's path stay at the site."""
    secret = tmp_path / "site_secret_folder"
    secret.mkdir()
    (secret / "prior.json").write_text("[1, 3]")
    run = copy_run(gray_run, secret)
    (run / "audit.json").unlink(missing_ok=True)
    sheet = export_run(run, tmp_path / "out", ExportOptions(n=10, class_prior=str(secret / "prior.json"), allow_unaudited=True))
    assert sheet["export"]["class_prior"]["spec"] == "prior.json" and "RUN" in sheet["audit"]["reason"]
    assert "site_secret_folder" not in (tmp_path / "out" / "datasheet.json").read_text() + (tmp_path / "out" / "DATASHEET.md").read_text()


def test_sigterm_during_an_export_leaves_no_output_and_stale_staging_is_removed(gray_run, tmp_path, monkeypatch):
    import os
    import signal
    import time

    from fedpggan.export import staging
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-killed"  # what an export killed with SIGKILL leaves
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * staging.STALE_SECONDS,) * 2)
    real_write = ImageFolderWriter.write

    def write_then_terminated(self, *args):
        real_write(self, *args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ImageFolderWriter, "write", write_then_terminated)
    with pytest.raises(KeyboardInterrupt):
        export_run(gray_run, out, ExportOptions(n=30, chunk_size=10))
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_large_image_size_is_generated_in_smaller_chunks_and_too_large_one_refused():
    assert ExportOptions(image_size=1024).images_per_chunk(1024, 3) == 21  # 256 MB of float32 images
    assert ExportOptions().images_per_chunk(28, 1) == 500
    with pytest.raises(FedPGGANError, match="between 4 and 1024"):
        ExportOptions(image_size=10**6)


def test_interrupted_export_leaves_no_output_and_keeps_the_old_one(gray_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_run(gray_run, out, ExportOptions(n=30))
    before = png_bytes(out), (out / "synthetic.npz").read_bytes()
    real_write, calls = ImageFolderWriter.write, []

    def write_then_crash(self, *args):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise KeyboardInterrupt
        real_write(self, *args)

    monkeypatch.setattr(ImageFolderWriter, "write", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        export_run(gray_run, out, ExportOptions(n=100, chunk_size=20, overwrite=True))
    assert (png_bytes(out), (out / "synthetic.npz").read_bytes()) == before
    with pytest.raises(KeyboardInterrupt):
        export_run(gray_run, tmp_path / "fresh", ExportOptions(n=100, chunk_size=20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half export, no hidden leftovers


def test_streaming_memory_is_bounded_by_the_chunk_not_n(gray_run, tmp_path, monkeypatch):
    """Chunks are numpy-owned so tracemalloc sees them and any copy kept of them; holding the
    20000 images (15.7 MB) anywhere fails the peak check, holding chunks fails the weakref check."""
    n, chunk, alive, sizes = 20000, 500, [], []

    def fake_chunk(gan, plan, lo, hi, seed, image_size):
        sizes.append(hi - lo)
        images = np.empty((hi - lo, 28, 28), np.uint8)
        images[:] = (np.arange(hi - lo) % 251)[:, None, None]
        alive.append(weakref.ref(images))
        assert sum(ref() is not None for ref in alive) <= 2, "earlier chunks are still referenced"
        return images

    monkeypatch.setattr(exporter, "sample_chunk", fake_chunk)
    tracemalloc.start()
    try:
        export_run(gray_run, tmp_path / "big", ExportOptions(n=n, chunk_size=chunk, formats=("npz",)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(sizes) == chunk and sum(sizes) == n
    assert peak < n * 28 * 28 / 4, f"peak {peak / 1e6:.1f} MB"
    with np.load(tmp_path / "big" / "synthetic.npz") as npz:
        assert np.array_equal(npz["train_images"][:, 0, 0], np.arange(n) % chunk % 251)


def test_options_are_checked(gray_run, tmp_path):
    assert [sum(apportion(t, [0.2, 0.3, 0.5])) for t in (0, 1, 7, 1000)] == [0, 1, 7, 1000]
    for bad in ("0.8/0.1", "a/b", "0/0.5/0.5", "0.5/0.5/0.5/0"):
        with pytest.raises(FedPGGANError, match="--split"):
            parse_split(bad)
    with pytest.raises(FedPGGANError, match="exclusive"):
        ExportOptions(n=10, per_class=(5,))
    with pytest.raises(FedPGGANError, match="--per-class"):
        export_run(gray_run, tmp_path / "x", ExportOptions(per_class=(1, 2, 3)))
    with pytest.raises(SystemExit):
        cli(gray_run, "--out", tmp_path / "y", "--n", 5, "--per-class", 3)
    with pytest.raises(FedPGGANError, match="--class-prior applies to --n only"):  # it would be ignored
        ExportOptions(per_class=(5, 5), class_prior="0.9,0.1")
    # an ImageFolder cannot hold an empty class (torchvision refuses it); an npz can
    for options in (ExportOptions(per_class=(10, 0)), ExportOptions(n=1)):
        with pytest.raises(FedPGGANError, match="class '.*' would get no image.*--format npz"):
            export_run(gray_run, tmp_path / "empty", options)
    assert not (tmp_path / "empty").exists()
    assert export_run(gray_run, tmp_path / "npz", ExportOptions(per_class=(10, 0), formats=("npz",)))[
        "export"]["class_counts"] == {"no lesion": 10, "lesion": 0}


def test_out_dot_is_refused_and_a_checkpoint_path_stays_out_of_the_datasheet(gray_run, tmp_path, monkeypatch):
    """An export replaces its folder as a whole: the folder one stands in (``--out .``) or one above it
    would leave the shell in a deleted folder, so they are refused in one line before any work;
    a ``--checkpoint`` path is named in the datasheet by its file name only."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", "..", "sub/.."):
        with pytest.raises(FedPGGANError, match="is the folder you are in .*--out ./export"):
            export_run(gray_run, out, ExportOptions(n=10, formats=("npz",)))
    assert list(here.iterdir()) == []
    checkpoint = sorted((gray_run / "checkpoints").glob("ckpt_*.pt"))[-1]
    sheet = export_run(gray_run, "export", ExportOptions(n=10, formats=("npz",), checkpoint=str(checkpoint)))
    assert sorted(p.name for p in (here / "export").iterdir()) == ["DATASHEET.md", "datasheet.json", "synthetic.npz"]
    assert "Run from the folder that holds the run folder" in (here / "export" / "DATASHEET.md").read_text()
    assert sheet["export"]["options"]["checkpoint"] == checkpoint.name
    assert str(tmp_path) not in (here / "export" / "datasheet.json").read_text()


def test_example_script_trains_on_the_export_and_tests_on_real_data(gray_run, tmp_path, capsys, monkeypatch):
    export_run(gray_run, tmp_path / "export", ExportOptions(n=64, split=(0.75, 0.25, 0.0), formats=("imagefolder",)))
    real = phantom_npz(tmp_path / "real.npz", channels=1, seed=3)
    spec = importlib.util.spec_from_file_location("train_on_synthetic", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    steps = []
    original_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or original_step(self, *a, **k))
    accuracy = example.main(["--export", str(tmp_path / "export"), "--real", str(real), "--epochs", "2", "--batch-size", "16"])
    printed = capsys.readouterr().out
    assert len(steps) == 2 * 3  # it trains: 48 synthetic images in batches of 16, twice
    assert "trained on 48 synthetic images" in printed  # and scores the real test split, as it says
    assert f"accuracy on 64 real test images: {accuracy:.3f}" in printed
    # the same real images as an ImageFolder, whose alphabetical class ids ("lesion" before "no lesion") are not the
    # run's, with the folder names of the data the run trained on (the export's folders are "0_no_lesion", ...)
    names = json.loads((gray_run / "run.json").read_text())["dataset"]["class_names"]
    assert sorted(names) != names and " " in names[0]
    with np.load(real) as data:
        test_images, test_labels = data["test_images"], data["test_labels"][:, 0]
    for i, (pixels, label) in enumerate(zip(test_images, test_labels)):
        (tmp_path / "folder" / "test" / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "folder" / "test" / names[label] / f"{i}.png")
    (tmp_path / "folder" / "test" / "cyst").mkdir()  # an empty folder: nothing to label, not an unknown class
    torch.manual_seed(0)
    again = example.main(["--export", str(tmp_path / "export"), "--real", str(tmp_path / "folder"), "--epochs", "2", "--batch-size", "16"])
    assert again == pytest.approx(accuracy)  # the same classifier (seed 0) on the same images, labelled by name
    Image.fromarray(test_images[0]).save(tmp_path / "folder" / "test" / "cyst" / "0.png")
    export_run(gray_run, tmp_path / "npz_only", ExportOptions(n=8, formats=("npz",)))
    for export, given_real, says in ((tmp_path / "npz_only", real, "no images/ folder; export with --format imagefolder"),
                                     (tmp_path / "export", tmp_path / "none.npz", "none.npz: not found"),
                                     (tmp_path / "export", tmp_path / "folder", "class folder(s) cyst are not classes of the export")):
        with pytest.raises(SystemExit) as stopped:  # a plausible slip: one line, not a traceback
            example.main(["--export", str(export), "--real", str(given_real)])
        assert stopped.value.code == 2 and says in capsys.readouterr().err


def test_a_checkpoint_the_run_set_aside_is_exported_with_a_warning(gray_run, tmp_path):
    """A resume marks a checkpoint it could not use discarded; its rounds were charged, so it may still be
    exported by name, but the datasheet says the run did not go on from it."""
    run = copy_run(gray_run, tmp_path)
    checkpoint = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    edit_ledger(run, lambda led: led["checkpoints"][-1].update(discarded="missing at the resume of 2026-12-06"))
    write_audit(run, passed=True)
    sheet = export_run(run, tmp_path / "out", ExportOptions(n=10, formats=("npz",), checkpoint=str(checkpoint)))
    assert any(w.startswith("CHECKPOINT SET ASIDE") and "missing at the resume" in w for w in sheet["warnings"])
    assert "CHECKPOINT SET ASIDE" in (tmp_path / "out" / "DATASHEET.md").read_text()
