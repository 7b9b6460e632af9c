"""benchmarks/quality.py: run folders are reused only with identical settings, every row builds a
valid config, and the training-seed summaries pool the right rows."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest

from conftest import REPO
from fedpggan.config import RunConfig
from fedpggan.data import medmnist
from fedpggan.errors import FedPGGANError

# benchmarks/ is no package (and a PyPI 'benchmarks' may shadow it): load the script by path.
_spec = importlib.util.spec_from_file_location("quality_under_test", REPO / "benchmarks" / "quality.py")
quality = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def write_run(folder, cfg: RunConfig, status: str) -> None:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": status, "config": cfg.to_flower()}))


def test_completed_run_with_reuses_only_identical_settings(tmp_path):
    cfg = RunConfig(epsilon=1.0, g_steps=2)
    assert not quality.completed_run_with(tmp_path / "absent", cfg)
    write_run(tmp_path / "same", dataclasses.replace(cfg, out="elsewhere"), "completed")
    assert quality.completed_run_with(tmp_path / "same", cfg)  # the folder's own path may differ
    write_run(tmp_path / "stopped", cfg, "stopped")
    assert not quality.completed_run_with(tmp_path / "stopped", cfg)
    write_run(tmp_path / "other", dataclasses.replace(cfg, g_steps=8), "completed")
    with pytest.raises(FedPGGANError, match="g-steps: 8, this row wants 2"):
        quality.completed_run_with(tmp_path / "other", cfg)


def test_a_run_saved_before_an_option_existed_holds_the_default_it_trained_with(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    saved = {k: v for k, v in RunConfig().to_flower().items() if k != "fake-gradients"}
    (folder / "run.json").write_text(json.dumps({"status": "completed", "config": saved}))
    assert RunConfig().fake_gradients == "exact"  # today's default is not what that run trained with
    assert quality.completed_run_with(folder, RunConfig(fake_gradients="clipped"))
    with pytest.raises(FedPGGANError, match="fake-gradients: 'clipped', this row wants 'exact'"):
        quality.completed_run_with(folder, RunConfig())


@pytest.mark.parametrize("profile", sorted(quality.PROFILES))
def test_every_row_builds_a_valid_config_with_its_generator_steps(profile):
    settings = quality.PROFILES[profile]
    base = RunConfig(dataset="phantom", clients=5, local_steps=settings["local_steps"])
    for name, kind, length, overrides in quality.row_specs(settings):
        cfg = quality.row_config(kind, length, overrides, base, settings).validate()
        assert cfg.rounds == settings[f"{length}_rounds"], name
        assert cfg.g_steps == overrides.get("g_steps", settings[f"{length}_g_steps"]), name
        assert {k: getattr(cfg, k) for k in overrides} == overrides, name


@pytest.mark.parametrize("profile", sorted(quality.PROFILES))
def test_every_row_trains_in_its_own_run_folder(profile):
    names = [name for name, *_ in quality.row_specs(quality.PROFILES[profile])]
    assert len({quality.slug(name) for name in names}) == len(names)


def test_rows_option_selects_every_row_including_names_with_commas():
    names = [name for name, *_ in quality.row_specs(quality.PROFILES["cpu"])]
    assert any("," in name for name in names)  # the SNGAN baseline's name, for one
    assert quality.selected_rows(",".join(names), names) == names
    assert quality.selected_rows(" federated eps=1 , " + names[-1], names) == ["federated eps=1", names[-1]]
    with pytest.raises(ValueError, match="no row named 'federated eps=2'"):
        quality.selected_rows("federated eps=1,federated eps=2", names)


def test_seed_summaries_pool_each_runs_training_seeds_with_the_reference_as_seed_0():
    rows = [{"run": quality.SHORT_REFERENCE, "auc": 0.80},
            {"run": quality.loss_rule_row("average", 1), "auc": 0.84},
            {"run": quality.loss_rule_row("mean", 0), "auc": 0.70},
            {"run": quality.loss_rule_row("single", 0), "error": "RuntimeError: boom"},
            {"run": "federated eps=10", "auc": 0.90},
            {"run": quality.training_seed_row("federated eps=10", 2), "auc": 0.86}]
    summaries = quality.seed_summaries(rows, quality.PROFILES["cpu"])
    rules = {s["run"]: s for s in summaries["Loss rules at eps=10 over training seeds"]}
    assert rules["average"]["aucs"] == [0.80, 0.84]
    assert rules["average"]["mean"] == pytest.approx(0.82)
    assert rules["average"]["std"] == pytest.approx(0.0282843, rel=1e-5)
    assert rules["mean"] == {"run": "mean", "aucs": [0.70], "mean": pytest.approx(0.70), "std": None}
    assert "single" not in rules  # its only run failed: nothing to summarise
    headline = summaries["Headline runs over training seeds"]
    assert [(s["run"], s["aucs"]) for s in headline] == [("federated eps=10", [0.90, 0.86])]  # eps=1: none measured
    specs = {name: overrides for name, _kind, _length, overrides in quality.row_specs(quality.PROFILES["cpu"])}
    assert {quality.loss_rule_row(r, s) for r in quality.LOSS_RULES for s in range(3)} <= specs.keys()
    # the reference row really is the average rule's seed 0 (it relies on the defaults)
    reference = dataclasses.replace(RunConfig(), **specs[quality.SHORT_REFERENCE])
    assert (reference.loss_rule, reference.seed) == ("average", 0)
    hooks = dict(grad_sample_mode="hooks")  # every committed row was clipped by Opacus' hooks, the default then
    today = {quality.training_seed_row(name, s) for name in (*quality.HEADLINE_2026_12_06, *quality.ROWS_2026_12_07) for s in range(5)}
    assert all(overrides["grad_sample_mode"] == "hooks" for name, overrides in specs.items() if name not in today)
    for name, (eps, settings) in quality.ROWS_2026_12_07.items():  # the probes of 2026-12-07: those defaults and their one change
        assert [specs[quality.training_seed_row(name, s)] for s in range(5)] == [
            dict(epsilon=eps, seed=s, g_steps=0, embedding_noise_limit=1.0, grad_sample_mode="bookkeeping", **settings) for s in range(5)]
    for name, eps in quality.HEADLINE_2026_12_06.items():  # the defaults of 2026-12-06, pinned: generator steps by noise
        assert [specs[quality.training_seed_row(name, s)] for s in range(5)] == [
            dict(epsilon=eps, seed=s, g_steps=0, embedding_noise_limit=1.0, grad_sample_mode="bookkeeping") for s in range(5)]
        config = quality.row_config("federated", "main", specs[name], RunConfig(), quality.PROFILES["cpu"])
        assert config.g_steps == 0 and config.g_steps != quality.PROFILES["cpu"]["main_g_steps"]  # not the profile's 2
    for name, eps in quality.HEADLINE.items():  # each headline row trains today's defaults with its seed,
        # pinning the noise limit it was measured with (for its release noise, 1.0 gates the same)
        assert [specs[quality.training_seed_row(name, s)] for s in range(3)] == [
            dict(epsilon=eps, seed=s, embedding_noise_limit=0.5, **hooks) for s in range(3)]
    for name, eps in quality.SECURE_HEADLINE.items():  # the secure rows: today's defaults, releases summed securely
        assert [specs[quality.training_seed_row(name, s)] for s in range(5)] == [
            dict(epsilon=eps, seed=s, release_aggregation="secure", **hooks) for s in range(5)]
    for name, eps in quality.WIDE_D_SECURE_HEADLINE.items():  # the secure rows again, D twice as wide
        assert [specs[quality.training_seed_row(name, s)] for s in range(5)] == [
            dict(epsilon=eps, seed=s, release_aggregation="secure", d_width=64, **hooks) for s in range(5)]
    for name, eps in quality.CENTRAL_HEADLINE.items():  # one holder of all the data: today's defaults
        assert [specs[quality.training_seed_row(name, s)] for s in range(5)] == [
            dict(epsilon=eps, seed=s, **hooks) for s in range(5)]
    breast = dict(dataset="breastmnist", clients=3)
    for name, eps in quality.BREAST_HEADLINE.items():  # BreastMNIST's defaults: seed 0 is the committed row, unseeded
        assert [specs[quality.training_seed_row(name, s)] for s in range(5)] == [
            dict(epsilon=eps, embedding_noise_limit=0.5, **breast, **hooks)] + [
            dict(epsilon=eps, seed=s, embedding_noise_limit=0.5, **breast, **hooks) for s in range(1, 5)]
    assert [specs[quality.training_seed_row(name, 4)] for name in quality.BREAST_SECURE_HEADLINE] == [
        dict(epsilon=10.0, seed=4, release_aggregation="secure", **breast, **hooks),  # PneumoniaMNIST's settings, unchanged
        dict(epsilon=1.0, seed=4, release_aggregation="secure", d_width=64, **breast, **hooks)]


def test_saved_table_carries_the_seed_summaries_in_json_and_markdown(tmp_path):
    meta = {"dataset": "phantom", "device": "cpu", "date": "2026-11-23", "profile": "cpu", "n_synthetic": 10,
            "eval_seeds": 1, "settings": quality.PROFILES["cpu"]}
    rows = [{"run": quality.SHORT_REFERENCE, "auc": 0.80}, {"run": quality.loss_rule_row("average", 1), "auc": 0.84}]
    quality.save(tmp_path / "table", rows, meta)
    saved = json.loads((tmp_path / "table.json").read_text())
    assert [s["run"] for s in saved["loss_rules"]] == ["average"] and saved["training_seeds"] == []
    assert "| average | 2 | 0.820 | 0.028 | 0.800, 0.840 |" in (tmp_path / "table.md").read_text()


def test_a_partial_run_keeps_earlier_rows_of_its_own_profile_only(tmp_path):
    meta = {"dataset": "phantom", "device": "cpu", "date": "2026-11-23", "profile": "cpu", "n_synthetic": 10,
            "eval_seeds": 1, "settings": quality.PROFILES["cpu"]}
    quality.save(tmp_path / "table", [{"run": quality.SHORT_REFERENCE, "auc": 0.80}], meta)
    quality.save(tmp_path / "table", [{"run": quality.loss_rule_row("average", 1), "auc": 0.84}], meta)
    assert len(json.loads((tmp_path / "table.json").read_text())["rows"]) == 2  # the same profile: kept
    smoke = {**meta, "profile": "smoke", "settings": quality.PROFILES["smoke"]}
    quality.save(tmp_path / "table", [{"run": quality.loss_rule_row("average", 1), "auc": 0.5}], smoke)
    assert [r["auc"] for r in json.loads((tmp_path / "table.json").read_text())["rows"]] == [0.5]  # never mixed


def test_a_failed_row_keeps_the_earlier_measurement_and_the_script_exits_non_zero(tmp_path, capsys, monkeypatch):
    """A re-run that fails (here: data that cannot be found) must not replace a measured figure, nor
    let automation believe it succeeded."""
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "no_root"))  # not found on any machine: no other
    monkeypatch.setenv("HOME", str(tmp_path / "no_home"))  # folder to look in, and no download
    monkeypatch.setattr(medmnist, "fetch", lambda url, dest: (_ for _ in ()).throw(OSError("offline")))
    args = ["--dataset", "pneumoniamnist", "--data-dir", str(tmp_path / "nowhere"), "--profile", "smoke", "--device", "cpu",
            "--rows", "federated eps=10", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]
    assert quality.main(args) == 1
    assert "1 row(s) failed: federated eps=10" in capsys.readouterr().err
    path = next(tmp_path.glob("quality-pneumoniamnist-cpu-*.json"))
    assert path.name.startswith("quality-pneumoniamnist-cpu-smoke-profile-")  # never the cpu profile's table of the day
    saved = json.loads(path.read_text())
    assert "error" in saved["rows"][0]  # nothing measured before: the failure is the row
    saved["rows"] = [{"run": "federated eps=10", "kind": "federated", "auc": 0.9}]
    path.write_text(json.dumps(saved))
    assert quality.main(args) == 1
    assert json.loads(path.read_text())["rows"] == [{"run": "federated eps=10", "kind": "federated", "auc": 0.9}]


def test_training_seconds_are_the_recorded_round_or_epoch_times_however_the_run_was_obtained(tmp_path):
    """A fresh, a reused and a resumed run report the same kind of time: the rounds' (or epochs')
    own recorded times, never wall time that would include restarts or evaluation."""
    federated, centralised = tmp_path / "federated", tmp_path / "centralised"
    for folder, key in ((federated, "t_round"), (centralised, "t_epoch")):
        folder.mkdir()
        rows = [{key: 1.5}, {"event": "site_failed"}, {key: 2.25}]  # event rows carry no time
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert quality.recorded_seconds(federated) == pytest.approx(3.75)
    assert quality.recorded_seconds(centralised) == pytest.approx(3.75)
    untimed = tmp_path / "untimed"  # a centralised run saved before epochs were timed: unknown, not 0
    untimed.mkdir()
    (untimed / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    assert quality.recorded_seconds(untimed) is None


def test_a_run_saved_before_the_count_share_existed_released_an_even_split(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    saved = {k: v for k, v in RunConfig(fake_gradients="clipped").to_flower().items() if k != "embedding-count-share"}
    (folder / "run.json").write_text(json.dumps({"status": "completed", "config": saved}))
    assert RunConfig().embedding_count_share == 0.1
    assert quality.completed_run_with(folder, RunConfig(fake_gradients="clipped", embedding_count_share=0.5))
    with pytest.raises(FedPGGANError, match="embedding-count-share: 0.5, this row wants 0.1"):
        quality.completed_run_with(folder, RunConfig(fake_gradients="clipped"))


@pytest.mark.skipif(quality.torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_is_a_one_line_error(tmp_path, capsys):
    args = ["--data-dir", str(tmp_path), "--device", "cuda", "--profile", "smoke", "--results", str(tmp_path)]
    assert quality.main(args) == 2
    assert "--device cuda: no CUDA GPU is visible" in capsys.readouterr().err and not list(tmp_path.iterdir())
