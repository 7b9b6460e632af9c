"""The centralised trainer and the CLI's handling of bad input."""

from __future__ import annotations

import json

import pytest

from fedpggan.cli import main
from fedpggan.config import RunConfig


def test_tiny_centralised_dp_run_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "phantom", "--epochs", "2", "--epsilon", "5", "--batch-size", "32",
                 "--g-width", "16", "--d-width", "8", "--latent-dim", "16", "--out", str(out)])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["dataset"]["is_medical"] is False
    assert "not medical data" in run["dataset"]["name"]
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert 0 < ledger["guarantee"]["epsilon"] <= 5.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"d_loss", "d_acc_real", "d_acc_fake", "loss_g1", "loss_g2", "case_neither", "epsilon", "t_epoch"} <= set(rows[0])
    assert rows[1]["epsilon"] > rows[0]["epsilon"]
    assert (out / "samples" / "epoch_00002.png").stat().st_size > 0
    assert (out / "curves" / "training.png").stat().st_size > 0
    assert len(json.loads((out / "checkpoints" / "index.json").read_text())) == 2
    # The same folder is refused the second time, and nothing in it is touched.
    before = (out / "run.json").read_bytes()
    assert main(["train", "--dataset", "phantom", "--epochs", "1", "--out", str(out)]) == 2
    assert (out / "run.json").read_bytes() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--clients", "0"], "--clients 0 is invalid"),
        (["train", "--epochs", "0"], "--epochs 0 is invalid"),
        (["train", "--dataset", "/nonexistent/file.npz"], "file.npz"),
        (["train", "--class-prior", "0.5,x"], "--class-prior"),
        (["train", "--epsilon", "-1"], "--epsilon -1.0 is invalid"),
        (["simulate", "--clients", "3", "--min-clients", "5"], "--min-clients 5 exceeds --clients 3"),
    ],
)
def test_bad_options_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_toml_config_and_flag_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('clients = 7\nrounds = 3\nloss-rule = "mean"\n')
    from fedpggan.commands.train import OPTIONS  # noqa: F401  (the CLI builds from RunConfig)
    from fedpggan.config import load_toml

    cfg = RunConfig.from_dict({**load_toml(toml), "rounds": 9}, source=str(toml))
    assert (cfg.clients, cfg.rounds, cfg.loss_rule) == (7, 9, "mean")
    toml.write_text("clientz = 7\n")
    assert main(["simulate", "--config", str(toml)]) == 2
    toml.write_text("clients = [\n")
    assert main(["simulate", "--config", str(toml)]) == 2


def test_flower_run_config_round_trip():
    cfg = RunConfig(epsilon=float("inf"), clients=4)
    back = RunConfig.from_flower(cfg.to_flower())
    assert back == cfg and not back.dp


def test_a_run_saved_before_a_default_changed_reads_back_as_it_trained():
    """A run.json without fake-gradients was trained (and must resume) with the one-pass step."""
    saved = {k: v for k, v in RunConfig(epsilon=1.0).to_flower().items() if k != "fake-gradients"}
    assert RunConfig.from_flower(saved).fake_gradients == "exact"  # today's default
    assert RunConfig.from_saved(saved) == RunConfig(epsilon=1.0, fake_gradients="clipped")
    assert RunConfig.from_saved(RunConfig().to_flower()).fake_gradients == "exact"  # a saved value wins
    # the embedding release's layout likewise: an even split before the count share existed
    saved = {k: v for k, v in RunConfig().to_flower().items() if k != "embedding-count-share"}
    assert RunConfig.from_saved(saved).embedding_count_share == 0.5 and RunConfig().embedding_count_share == 0.1


def test_a_site_reads_an_option_its_coordinator_does_not_send_as_of_the_day_before_it_existed():
    """A site newer than its coordinator must encode its release the way that coordinator decodes it."""
    from types import SimpleNamespace

    from client.client_app import run_config_of

    sent = {k: v for k, v in RunConfig().to_flower().items() if k != "embedding-count-share"}
    cfg, _ = run_config_of(SimpleNamespace(content={"config": {**sent, "round": 3}}))
    assert cfg.embedding_count_share == 0.5
    cfg, _ = run_config_of(SimpleNamespace(content={"config": RunConfig().to_flower()}))
    assert cfg.embedding_count_share == 0.1


def test_train_accepts_every_embedding_option(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "phantom", "--epochs", "1", "--epsilon", "5", "--batch-size", "32",
                 "--g-width", "16", "--d-width", "8", "--latent-dim", "16", "--embedding-blur", "1",
                 "--embedding-count-share", "0.3", "--embedding-frequencies", "20", "--embedding-steps", "2",
                 "--embedding-noise-limit", "inf", "--out", str(out)])
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    saved = info["config"]
    assert (saved["embedding-count-share"], saved["embedding-blur"], saved["embedding-steps"]) == (0.3, 1.0, 2)
    assert info["embedding_noise_ratio"] > 0  # estimated from the release's public noise level
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["embedding_steps"] > 0 and rows[0]["embedding_steps"] % 2 == 0  # 2 per generator step: the limit is inf
    # with a limit of 0 a DP release never counts as clean: no embedding steps
    code = main(["train", "--dataset", "phantom", "--epochs", "1", "--epsilon", "5", "--batch-size", "32",
                 "--g-width", "16", "--d-width", "8", "--latent-dim", "16", "--embedding-frequencies", "20",
                 "--embedding-noise-limit", "0", "--out", str(tmp_path / "gated")])
    assert code == 0
    assert json.loads((tmp_path / "gated" / "metrics.jsonl").read_text().splitlines()[0])["embedding_steps"] == 0
