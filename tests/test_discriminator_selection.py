"""benchmarks/discriminator_selection.py keeps, per class, exactly the best-scored samples."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from conftest import REPO, fix_today
from fedpggan.evaluation.utility import synthetic_set
from pggan_model import PGGAN
from pggan_model.networks import ModelShape

_spec = importlib.util.spec_from_file_location("selection_under_test", REPO / "benchmarks" / "discriminator_selection.py")
selection = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection)


@pytest.mark.parametrize("ranking", selection.RANKINGS)
def test_selection_keeps_the_top_of_each_class_with_balanced_labels(ranking):
    torch.manual_seed(0)
    gan = PGGAN(ModelShape(image_size=28, channels=1, num_classes=3, g_width=8, d_width=8)).eval()
    images, labels = selection.selected_set(gan, n=10, oversample=3, ranking=ranking, seed=1)
    assert torch.bincount(labels, minlength=3).tolist() == [4, 3, 3]  # as synthetic_set balances 10 over 3
    pool, pool_labels = synthetic_set(gan, 30, "both", 1)
    scores = selection.selection_score(gan, pool, pool_labels, ranking)
    kept = selection.selection_score(gan, images, labels, ranking)
    for c in range(3):
        best = scores[pool_labels == c].sort(descending=True).values[: int((labels == c).sum())]
        assert torch.allclose(kept[labels == c].sort(descending=True).values, best, atol=1e-5)


def test_margin_is_own_label_minus_best_other_label():
    torch.manual_seed(0)
    gan = PGGAN(ModelShape(image_size=28, channels=1, num_classes=3, g_width=8, d_width=8)).eval()
    x, y = synthetic_set(gan, 6, "both", 0)
    with torch.no_grad():
        all_labels = torch.stack([gan.d(x, torch.full_like(y, c)) for c in range(3)], 1)
    own = all_labels.gather(1, y[:, None]).squeeze(1)
    other = all_labels.masked_fill(torch.nn.functional.one_hot(y, 3).bool(), -torch.inf).amax(1)
    assert torch.allclose(selection.selection_score(gan, x, y, "margin"), own - other, atol=1e-5)


def test_a_centralised_run_is_described_by_its_own_settings_and_its_spent_epsilon(tmp_path):
    """The table must not show federated defaults a centralised run never used, nor its budget as spend."""
    from fedpggan.cli import main

    run = tmp_path / "run"
    assert main(["train", "--dataset", "phantom", "--epochs", "1", "--g-width", "8", "--d-width", "8", "--batch-size", "32",
                 "--g-batch-size", "32", "--embedding-weight", "0", "--epsilon", "10", "--out", str(run)]) == 0
    rows = selection.measure(run, None, n=40, oversample=2, seeds=1)
    spent = json.loads((run / "privacy_ledger.json").read_text())["guarantee"]["epsilon"]
    assert {tuple(r["settings"]) for r in rows} == {("epochs", "d-steps", "embedding-share")}
    assert all(r["epsilon"] == spent < r["budget_epsilon"] == 10.0 for r in rows)
    table = selection.markdown(rows, {"device": "cpu", "date": "today", "n": 40, "seeds": 1, "oversample": 2})
    assert f"| run | {spent:.2f} | epochs 1, d-steps " in table



def test_a_second_run_the_same_day_is_refused_before_any_run_is_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(selection, "measure", lambda *a: pytest.fail("measured although the results would be refused"))
    stem = tmp_path / f"discriminator-selection-cpu-{fix_today(monkeypatch, selection)}"
    stem.with_suffix(".md").write_text("today's table")
    assert selection.main([str(tmp_path / "run"), "--results", str(tmp_path)]) == 2
    assert f"{stem}.md: already exists" in capsys.readouterr().err
    assert stem.with_suffix(".md").read_text() == "today's table"
