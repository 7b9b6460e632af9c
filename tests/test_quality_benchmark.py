"""benchmarks/quality.py: a run folder is reused only when it holds exactly the row's settings."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest

from conftest import REPO
from fedpggan.config import RunConfig
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


@pytest.mark.parametrize("profile", sorted(quality.PROFILES))
def test_every_row_builds_a_valid_config_with_its_generator_steps(profile):
    settings = quality.PROFILES[profile]
    base = RunConfig(dataset="phantom", clients=5, local_steps=settings["local_steps"])
    for name, kind, length, overrides in quality.row_specs(settings):
        cfg = quality.row_config(kind, length, overrides, base, settings).validate()
        assert cfg.rounds == settings[f"{length}_rounds"], name
        assert cfg.g_steps == overrides.get("g_steps", settings[f"{length}_g_steps"]), name
        assert {k: getattr(cfg, k) for k in overrides} == overrides, name
