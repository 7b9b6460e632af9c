"""benchmarks/embedding_snr.py: the DP embedding target's noise and the noise trap, per blur."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO, fix_today

_spec = importlib.util.spec_from_file_location("embedding_snr_under_test", REPO / "benchmarks" / "embedding_snr.py")
snr = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(snr)


def test_rows_per_blur_and_budget_and_the_blur_widens_the_noise_trap(tmp_path, monkeypatch):
    fix_today(monkeypatch, snr)  # the second call is refused as the same day's
    args = ["--dataset", "phantom", "--sites", "2", "--frequencies", "50", "--blurs", "0,1", "--epsilons", "1,10",
            "--repeats", "1", "--results", str(tmp_path)]
    assert snr.main(args) == 0
    rows = json.loads(next(tmp_path.glob("embedding-snr-phantom-*.json")).read_text())["rows"]
    assert [(r["blur"], r["eps"]) for r in rows] == [(0.0, 1.0), (0.0, 10.0), (1.0, 1.0), (1.0, 10.0)]
    for white, blurred in ((rows[0], rows[2]), (rows[1], rows[3])):
        assert blurred["noise_trap_over_separation"] > white["noise_trap_over_separation"]
    for r in rows[:2], rows[2:]:  # ten times the budget: less noise in every class's target
        assert all(a > b for a, b in zip(r[0]["noise_over_separation"].values(), r[1]["noise_over_separation"].values()))
    assert "| 50 | 1 | 0.1 | 10 |" in next(tmp_path.glob("embedding-snr-phantom-*.md")).read_text()
    written = {f: f.read_bytes() for f in tmp_path.iterdir()}
    assert snr.main(args[:-2] + ["--epsilons", "5", "--results", str(tmp_path)]) == 2  # the same day: refused, nothing lost
    assert {f: f.read_bytes() for f in tmp_path.iterdir()} == written


def test_a_small_count_share_makes_the_class_means_less_noisy(tmp_path):
    """Same privacy (sensitivity 1, same noise): with 10 % of each record's norm on its count
    instead of half, the 100 feature coordinates carry more signal per unit of noise."""
    args = ["--dataset", "phantom", "--sites", "2", "--frequencies", "50", "--count-shares", "0.1,0.5",
            "--epsilons", "1", "--repeats", "2", "--results", str(tmp_path)]
    assert snr.main(args) == 0
    small, even = json.loads(next(tmp_path.glob("embedding-snr-phantom-*.json")).read_text())["rows"]
    assert (small["count_share"], even["count_share"]) == (0.1, 0.5)
    for name, error in small["noise_over_separation"].items():
        assert error < 0.85 * even["noise_over_separation"][name], name


def test_a_dataset_path_names_its_results_file_without_folder_or_dot():
    from fedpggan.io import dataset_slug

    assert dataset_slug("../data/PhantomRGB10.npz") == "phantomrgb10" and dataset_slug("pneumoniamnist") == "pneumoniamnist"
    assert dataset_slug("/sites/a/") == "a" and dataset_slug("...") == "data"
