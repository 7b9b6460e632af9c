"""benchmarks/speed.py: its measurements at a tiny size, and the arithmetic behind its tables."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fedpggan.config import FAKE_GRADIENTS, GRAD_SAMPLE_MODES, RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.privacy.noise import NOISE_KEYS

# benchmarks/ is no package (and a PyPI 'benchmarks' may shadow it): load the script by path.
_spec = importlib.util.spec_from_file_location("speed_under_test", REPO / "benchmarks" / "speed.py")
speed = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(speed)

TINY_GAN = RunConfig(g_width=16, d_width=8, latent_dim=16)


def test_dp_vs_plain_rows_have_positive_consistent_ratios():
    rows = speed.dp_vs_plain(TINY_GAN, 28, 8, GRAD_SAMPLE_MODES, speed.Timing(warmup=1, repeats=2, steps=1),
                             torch.device("cpu"))
    assert [(r["mode"], r["fakes"], r["noise"]) for r in rows] == [
        (m, f, n) for m in GRAD_SAMPLE_MODES for f in FAKE_GRADIENTS for n in NOISE_KEYS]
    for r in rows:
        assert r["image_size"] == 28 and r["batch"] == 8
        assert r["ratio"] > 0 and math.isfinite(r["ratio"])
        assert r["ratio"] == pytest.approx(r["plain_images_per_s"] / r["dp_images_per_s"])
        assert 0 < r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]


def test_seconds_per_image_counts_real_and_fake_images(monkeypatch):
    trainers = speed.make_trainers(TINY_GAN, 28, 8, [], torch.device("cpu"))
    ticks = iter([100.0, 104.0])  # a clock the timed section reads twice: 4 s, whatever the machine's load
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(ticks))
    per_image = speed.seconds_per_image(trainers["plain"], 2, torch.device("cpu"))
    # 2 steps of 8 real + 8 fakes (the plain loader gives fixed batches): 32 images in 4 s
    assert per_image == pytest.approx(4.0 / 32)
    assert not trainers["plain"].d._forward_pre_hooks  # the counting hook is removed


def test_generator_step_rows_time_both_steps_and_the_round_factor():
    profile = {**speed.PROFILES["smoke"], "sizes": (28,), "repeats": 3}
    (row,) = speed.generator_step_rows(profile, torch.device("cpu"), TINY_GAN)
    assert row["image_size"] == 28 and row["g_batch"] == TINY_GAN.g_batch_size
    assert row["adversarial_step_s"] > 0 and row["embedding_step_s"] > 0
    assert row["ratio"] == pytest.approx(row["embedding_step_s"] / row["adversarial_step_s"])
    assert row["generator_time_factor"] == pytest.approx(1 + TINY_GAN.embedding_steps * row["ratio"])
    text = speed.markdown({**empty_result(date="2026-12-03", timing={"repeats": 3, "steps": 1, "warmup": 1},
                                          simulation={"rounds": 2}, product_rounds=2, torch_threads=1, note=""),
                           "generator": [row]})
    assert "## Server generator steps" in text and f"| 28x28 | {TINY_GAN.g_batch_size} |" in text


def metrics_row(t_round, t_sites, t_server, compute):
    return {"t_round": t_round, "t_sites": t_sites, "t_server": t_server, "t_site_compute": compute}


def test_least_makespan_counts_the_sites_that_share_an_actor():
    assert speed.least_makespan([1.0] * 5, 2) == pytest.approx(3.0)  # 3 sites on one actor, not 2.5
    assert speed.least_makespan([4.0, 1.0, 1.0], 2) == pytest.approx(4.0)  # the longest site
    assert speed.least_makespan([3.0, 3.0, 3.0, 3.0], 2) == pytest.approx(6.0)  # even split: sum / workers
    assert speed.least_makespan([1.0] * 5, 8) == pytest.approx(1.0)


def test_round_breakdown_packs_site_compute_onto_workers_and_skips_round_one():
    steady = [1.2, 1.2, 1.2, 1.2, 1.2]
    run = {"sites": 5, "workers": 2, "peak_rss_mb": 900.0, "simulation_s": 60.0, "settings": {"g-steps": 2},
           "rounds": [metrics_row(50, 45, 4, [9.0] * 5), metrics_row(10, 8, 1.5, steady), metrics_row(10, 8, 1.5, steady)]}
    b = speed.round_breakdown(run)
    assert b["site_training_s"] == pytest.approx(3.6)  # 3 of the 5 sites run on one of the 2 actors
    assert b["packing_idle_s"] == pytest.approx(0.6)  # 3.6 s against 6 s of compute / 2 actors
    assert b["flower_overhead_s"] == pytest.approx(4.4)
    assert b["flower_overhead_share"] == pytest.approx(0.44)
    assert b["other_s"] == pytest.approx(0.5) and b["first_round_s"] == 50
    run["workers"] = 8  # more actors than sites: the slowest site bounds the round
    assert speed.round_breakdown(run)["site_training_s"] == pytest.approx(1.2)


def test_round_tables_describe_the_settings_the_runs_trained_with_not_todays_defaults():
    settings = {"local-steps": 8, "batch-size": 64, "g-steps": 8, "g-batch-size": 128, "g-width": 64, "d-width": 32,
                "embedding-weight": 10.0}
    text = speed.settings_text([{"settings": settings}, {"settings": dict(settings)}])
    assert "8 local D steps of batch 64, 8 generator steps of batch 128" in text and "embedding weight 10.0" in text
    assert speed.settings_text([{"sites": 5}]) == "settings not recorded with these rows"  # an older results file
    assert "differ" in speed.settings_text([{"settings": settings}, {"settings": {**settings, "g-steps": 2}}])
    assert speed.settings_text([{"settings": settings}, {"sites": 5}]) == "settings not recorded with some of these rows"


def test_scaling_fit_recovers_per_site_cost():
    rows = [{"sites": n, "round_s": 2 + 0.5 * n, "peak_rss_mb": 800 + 30 * n} for n in (5, 20, 50, 100)]
    fit = speed.scaling_fit(rows)
    assert fit["round_s_per_site"] == pytest.approx(0.5) and fit["rss_mb_per_site"] == pytest.approx(30)
    assert speed.scaling_fit(rows[:1]) is None


def test_peak_memory_includes_child_processes():
    own = speed.rss_and_actors([speed.os.getpid()])[0]
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); print('held', flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"  # sampled only once the child holds its memory, however slow it starts
        with speed.PeakMemory(interval=0.1) as memory:
            speed.time.sleep(0.5)
    finally:
        child.kill()
        child.wait()
    assert memory.peak_bytes > own + 150 * 2**20 and memory.actors == 0


def quality_json(tmp_path, **row):
    path = tmp_path / "quality.json"
    base = {"run": speed.TARGET_ROW, "train_seconds": 240.0, "auc": 0.95, "label_fidelity": 0.92, "collapsed_classes": [],
            "config": {"rounds": 300, "local-steps": 20, "g-steps": 4, "embedding-noise-limit": 0.5, "grad-sample-mode": "hooks"}}
    path.write_text(json.dumps({"meta": {"device": "NVIDIA-H100"}, "rows": [base | row]}))
    return path


def test_target_from_quality_results(tmp_path):
    target = speed.target_from_results(quality_json(tmp_path))
    assert target["status"] == "measured" and target["train_seconds"] == 240.0 and target["target_met"]
    assert target["trained_with"] == {"rounds": 300, "local-steps": 20, "g-steps": 4, "embedding-noise-limit": 0.5,
                                      "grad-sample-mode": "hooks"}  # the profile pins some away from the defaults: say so
    assert "trained with rounds 300, local-steps 20, g-steps 4, embedding-noise-limit 0.5, grad-sample-mode hooks" in \
        speed.target_line(target)
    assert not speed.target_from_results(quality_json(tmp_path, auc=0.90))["target_met"]
    assert not speed.target_from_results(quality_json(tmp_path, collapsed_classes=["normal"]))["target_met"]
    with pytest.raises(FedPGGANError, match="no completed"):
        speed.target_from_results(quality_json(tmp_path, run="federated eps=1"))
    damaged = quality_json(tmp_path)
    damaged.write_text(damaged.read_text()[:-20])  # cut short
    with pytest.raises(FedPGGANError, match="not a results file of benchmarks/quality.py"):
        speed.target_from_results(damaged)


def test_target_without_gpu_is_reported_unmeasured():
    args = speed.argparse.Namespace(target_results="", target_run=False, data_dir="", results="unused")
    assert speed.target_entry(args, torch.device("cpu"), None) == {"status": "not measured: no GPU"}
    args.target_run = True
    with pytest.raises(FedPGGANError, match="needs a CUDA GPU"):
        speed.target_entry(args, torch.device("cpu"), None)


def test_bad_parts_is_a_one_line_error(capsys):
    assert speed.main(["--parts", "discriminator,warp", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --parts")


def test_a_d_grid_stopped_mid_way_keeps_the_cells_it_finished(tmp_path, monkeypatch):
    """A lent GPU's minutes can run out inside the grid: every finished cell is already on disk."""
    cells = []

    def one_cell(gan_cfg, size, batch, modes, timing, device, bar=None):
        if cells:
            raise KeyboardInterrupt  # the time limit, in the second cell
        cells.append((size, batch))
        return [{"image_size": size, "batch": batch, "mode": "hooks", "fakes": "exact", "noise": "seed",
                 "dp_images_per_s": 1.0, "plain_images_per_s": 1.5, "ratio": 1.5, "ratio_range": [1.4, 1.6]}]

    monkeypatch.setattr(speed, "dp_vs_plain", one_cell)
    monkeypatch.setitem(speed.PROFILES, "two-cells", {**speed.PROFILES["smoke"], "batches": (8, 16)})
    assert speed.main(["--profile", "two-cells", "--device", "cpu", "--parts", "discriminator",
                       "--results", str(tmp_path)]) == 130  # what the session script's `timeout -s INT` ends in
    [saved] = tmp_path.glob("speed-cpu-*.json")
    assert saved.name.startswith("speed-cpu-two-cells-profile-")  # not the cpu profile's file of the day
    rows = json.loads(saved.read_text())["discriminator"]
    assert cells == [(28, 8)] and [(r["image_size"], r["batch"]) for r in rows] == [(28, 8)]


MACHINE = {"profile": "cpu", "device": "cpu (x86_64, 2 CPU cores)", "versions": {"torch": "2.14.1"}}


def empty_result(**meta):
    return {"meta": {**MACHINE, **meta}, "discriminator": [], "generator": [], "product_rounds": [], "federated": [],
            "scaling_fit": None,
            "target": {"status": "not run (--parts)"}}


def test_a_partial_run_keeps_the_other_parts_of_the_same_machine_and_says_where_from(tmp_path):
    stem = tmp_path / "speed-cpu-2026-11-23"
    earlier = {"meta": {**MACHINE, "date": "2026-11-23"}, "discriminator": [{"ratio": 1.6}],
               "product_rounds": [{"sites": 5, "packing_idle_s": 0.5}], "federated": [{"sites": 5, "packing_idle_s": 0.0}],
               "scaling_fit": {"round_s_per_site": 0.2}, "target": {"status": "measured", "auc": 0.91}}
    stem.with_suffix(".json").write_text(json.dumps(earlier))
    fresh = empty_result()
    speed.keep_earlier_parts(stem, fresh, {"federated"})  # re-measuring the rounds keeps the D grid and the target
    assert fresh["discriminator"] == [{"ratio": 1.6}] and fresh["target"] == {"status": "measured", "auc": 0.91}
    assert fresh["product_rounds"] == [] and fresh["scaling_fit"] is None
    origin = {"file": "speed-cpu-2026-11-23.json", "date": "2026-11-23"}
    assert fresh["meta"]["kept_parts"] == {"discriminator": origin, "target": origin}
    for other in (empty_result(profile="gpu"), empty_result(device="cpu (x86_64, 16 CPU cores)"),
                  empty_result(versions={"torch": "2.15.0"})):
        speed.keep_earlier_parts(stem, other, {"federated"})  # another profile, machine or version: never mixed in
        assert other["discriminator"] == [] and "kept_parts" not in other["meta"]
    next_day = empty_result(date="2026-11-24")
    speed.keep_earlier_parts(tmp_path / "speed-cpu-2026-11-24", next_day, {"federated"})  # a later date finds it too
    assert next_day["discriminator"] == [{"ratio": 1.6}] and next_day["meta"]["kept_parts"]["discriminator"] == origin
    next_day["meta"]["date"] = "2026-11-24"
    (tmp_path / "speed-cpu-2026-11-24.json").write_text(json.dumps(next_day))
    third = empty_result()
    speed.keep_earlier_parts(tmp_path / "speed-cpu-2026-11-26", third, {"federated"})  # kept twice: still the 11-23 run
    assert third["meta"]["kept_parts"]["discriminator"] == origin
    (tmp_path / "speed-cpu-2026-11-25.json").write_text(json.dumps(earlier))  # a newer file than the run's date
    dated = empty_result()
    speed.keep_earlier_parts(tmp_path / "speed-cpu-2026-11-24", dated, {"federated"})  # is not "earlier"
    assert dated["meta"]["kept_parts"]["discriminator"] == origin  # from the 11-24 file, which kept it from 11-23


def test_rounds_of_an_older_format_are_not_kept(tmp_path):
    stem = tmp_path / "speed-cpu-2026-11-23"
    old = {**empty_result(date="2026-11-23"), "product_rounds": [{"sites": 5}], "federated": [{"sites": 5}],
           "discriminator": [{"ratio": 1.6}]}
    stem.with_suffix(".json").write_text(json.dumps(old))
    fresh = empty_result()
    speed.keep_earlier_parts(tmp_path / "speed-cpu-2026-11-24", fresh, {"discriminator"})
    assert fresh["product_rounds"] == []  # no packing_idle_s
    assert "kept_parts" not in fresh["meta"]  # nor a target that file did not run: it would be called "measured"


def test_product_size_rounds_use_the_default_models_and_tiny_ones_shrink_them(tmp_path):
    profile = speed.PROFILES["cpu"]
    product = speed.sim_config(5, profile, tmp_path, "product")
    defaults = RunConfig()
    assert (product.g_width, product.d_width, product.local_steps, product.g_steps, product.batch_size) == \
        (defaults.g_width, defaults.d_width, defaults.local_steps, defaults.g_steps, defaults.batch_size)
    assert product.rounds == profile["product_rounds"] and product.epsilon == 10.0
    tiny = speed.sim_config(100, profile, tmp_path, "tiny")
    assert (tiny.d_width, tiny.local_steps, tiny.rounds) == (8, profile["local_steps"], profile["rounds"])
    assert speed.round_table([]) == ["not measured (--parts)."]


def test_target_run_trains_the_quality_rows_config_with_sites_sharing_the_gpu(tmp_path, monkeypatch):
    quality = speed.load_sibling("quality")
    seen = {}

    def fake_row(name, kind, length, overrides, base, out, profile, device):
        seen.update(name=name, base=base, profile=profile)
        return {"run": name, "train_seconds": 200.0, "auc": 0.91, "label_fidelity": 0.93, "collapsed_classes": []}

    monkeypatch.setattr(quality, "run_gan_row", fake_row)
    monkeypatch.setattr(speed, "load_sibling", lambda name: quality)
    monkeypatch.setattr(speed, "device_name", lambda device: "NVIDIA-H100")  # no GPU here: only its name is read
    target = speed.run_target("/data", torch.device("cuda"), tmp_path, tmp_path)
    assert seen["name"] == speed.TARGET_ROW and seen["profile"] is quality.PROFILES["gpu"]
    assert (seen["base"].local_steps, seen["base"].client_gpus, seen["base"].data_dir) == \
        (quality.PROFILES["gpu"]["local_steps"], 0.2, "/data")
    assert not target["target_met"] and "training seed 0" in target["judged_on"]  # AUC 0.91 < 0.93
