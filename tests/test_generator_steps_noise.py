"""benchmarks/generator_steps_noise.py: the generator-step rule's input and choice per budget, as the server computes them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, fix_today
from fedpggan.config import RunConfig
from server.federated_run import FederatedRun

_spec = importlib.util.spec_from_file_location("generator_steps_noise_under_test", REPO / "benchmarks" / "generator_steps_noise.py")
script = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def server_choice(cfg: RunConfig, sizes: list[int]) -> tuple[float, int]:
    """What a FederatedRun with these registered sites computes and chooses at its start."""
    run = FederatedRun.__new__(FederatedRun)
    run.cfg, run.expected_mechanism, run.run_info, run.resume = cfg, {}, {}, False
    run.ledger = SimpleNamespace(data={"sites": {str(i): {"public_num_records": n} for i, n in enumerate(sizes)}})
    run.folder = SimpleNamespace(save_ledger=lambda *a: None)
    return run.averaged_d_noise(), run.choose_generator_steps()


def test_each_row_is_what_the_server_computes_and_more_budget_means_less_noise(tmp_path, capsys, monkeypatch):
    today = fix_today(monkeypatch, script)
    args = ["--dataset", "phantom", "--sites", "3", "--rounds", "4", "--epsilons", "1,10", "--local-steps", "2,4",
            "--results", str(tmp_path)]
    assert script.main(args) == 0
    saved = json.loads((tmp_path / f"generator-steps-noise-phantom-3sites-4rounds-{today}.json").read_text())
    sizes, rows = saved["meta"]["site_sizes"], saved["rows"]
    assert len(sizes) == 3 and sum(sizes) == saved["meta"]["records"]
    assert [(r["eps"], r["local_steps"]) for r in rows] == [(1.0, 2), (1.0, 4), (10.0, 2), (10.0, 4)]
    for r in rows:
        cfg = RunConfig(dataset="phantom", clients=3, rounds=4, epsilon=r["eps"], local_steps=r["local_steps"])
        noise, steps = server_choice(cfg, sizes)
        assert r["averaged_d_noise"] == pytest.approx(noise, rel=1e-12) and r["generator_steps"] == steps
    assert rows[0]["averaged_d_noise"] > rows[2]["averaged_d_noise"] and rows[1]["averaged_d_noise"] > rows[0]["averaged_d_noise"]
    table = next(tmp_path.glob("generator-steps-noise-phantom-*.md")).read_text()
    assert f"| 10 | 2 | {sum(rows[2]['noise_multiplier']) / 3:.3f} | {rows[2]['averaged_d_noise']:.4f} | {rows[2]['generator_steps']} |" in table

    # a second run the same day is refused before it computes anything, and today's results stay as they were
    written = {f: f.read_bytes() for f in tmp_path.iterdir()}
    capsys.readouterr()
    assert script.main(args[:-4] + ["--epsilons", "5", "--results", str(tmp_path)]) == 2
    assert "already exists (this benchmark ran today)" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in tmp_path.iterdir()} == written


@pytest.mark.parametrize("options", [dict(generator_training="local"), dict(fraction=0.4), dict(epsilon=math.inf)])
def test_a_row_follows_the_server_for_other_options_too(options):
    """Locally trained generators learn from one site's D, a fraction of the sites averages fewer, no DP has no noise."""
    sizes = [700, 700, 600, 600, 400]
    base = RunConfig(dataset="phantom", clients=5, rounds=4, local_steps=2, epsilon=10.0, accountant="rdp")  # rdp: quicker
    cfg = dataclasses.replace(base, **options)
    row, default = script.noise_row(cfg, sizes), script.noise_row(base, sizes)
    noise, steps = server_choice(cfg, sizes)
    assert row["averaged_d_noise"] == pytest.approx(noise, rel=1e-12) and row["generator_steps"] == steps
    assert row["averaged_d_noise"] > default["averaged_d_noise"] if cfg.dp else row["averaged_d_noise"] == 0.0


def test_bad_lists_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.main(["--dataset", "phantom", "--epsilons", "1,abc", "--results", str(tmp_path)])
    assert stopped.value.code == 2 and "'1,abc' is not a comma-separated list of float values" in capsys.readouterr().err
    assert script.main(["--dataset", "phantom", "--sites", "2", "--rounds", "2", "--local-steps", "4,0", "--results", str(tmp_path)]) == 2
    assert "--local-steps 0 is invalid" in capsys.readouterr().err and not list(tmp_path.iterdir())  # no row was computed
