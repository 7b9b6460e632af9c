"""benchmarks/unseen_data.py: the pooled ImageFolder holds every image of every split, pixel for
pixel, under one class folder per (dataset, class), and the row it trains exists in the quality table."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO, fix_today
from fedpggan.data import open_dataset
from fedpggan.errors import FedPGGANError
from test_data import write_npz

_spec = importlib.util.spec_from_file_location("unseen_under_test", REPO / "benchmarks" / "unseen_data.py")
unseen = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(unseen)


def test_class_folder_names_are_plain():
    assert unseen.class_folder("breastmnist", "normal, benign") == "breastmnist_normal_benign"
    assert unseen.class_folder("/data/site a/xray.npz", "0") == "xray_0"


def test_pooled_folder_keeps_every_image_and_label_of_every_split(tmp_path):
    a = write_npz(tmp_path / "alpha.npz", n=(6, 4, 4), classes=2, seed=1)
    b = write_npz(tmp_path / "beta.npz", n=(9, 3, 6), classes=3, seed=2)
    out = tmp_path / "pooled"
    unseen.build_folder([str(a), str(b)], None, out)
    for split in unseen.SPLITS:
        pooled = open_dataset(str(out), split, image_size=8)  # a folder is resized to 28 unless told
        parts = [open_dataset(str(p), split) for p in (a, b)]
        assert pooled.num_classes == 5
        assert len(pooled) == sum(len(p) for p in parts)
        for part in parts:
            for label, name in enumerate(part.class_names):
                wanted = pooled.class_names.index(unseen.class_folder(part.name, name))
                mine = part.images[part.labels == label]
                theirs = pooled.images[pooled.labels == wanted]
                # same pixels (uint8 round trip), same order within the class
                assert torch.equal(mine, theirs), (split, part.name, name)
    assert not (tmp_path / "pooled.partial").exists()  # built under a temporary name, then renamed
    with pytest.raises(FedPGGANError, match="already exists"):
        unseen.build_folder([str(a)], None, out)


@pytest.mark.parametrize("profile", sorted(unseen.quality.PROFILES))
def test_the_row_it_trains_is_in_the_quality_table(profile):
    names = [name for name, *_ in unseen.quality.row_specs(unseen.quality.PROFILES[profile])]
    assert unseen.ROW in names


def test_a_second_run_the_same_day_is_refused_before_the_folder_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(unseen, "build_folder", lambda *a: pytest.fail("built although the results would be refused"))
    stem = tmp_path / f"quality-unseen-cpu-{fix_today(monkeypatch, unseen)}"
    stem.with_suffix(".json").write_text("{}")
    assert unseen.main(["--data-dir", str(tmp_path), "--device", "cpu", "--work", str(tmp_path / "work"),
                        "--results", str(tmp_path)]) == 2
    assert f"{stem}.json: already exists" in capsys.readouterr().err and stem.with_suffix(".json").read_text() == "{}"
