"""The centralised trainer and the CLI's handling of bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from fedpggan.cli import main
from fedpggan.config import RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.io import sha256_file
from fedpggan.runs import RunFolder


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


@pytest.mark.parametrize("command", ["train", "simulate"])
def test_a_folder_with_other_files_or_a_file_is_refused_as_out(command, tmp_path, capsys):
    """A run whose run.json was lost, or an export, must not get a new run's files mixed in."""
    lost = tmp_path / "lost"
    (lost / "checkpoints").mkdir(parents=True)
    (lost / "privacy_ledger.json").write_text("{}")
    (lost / "checkpoints" / "ckpt_00002.pt").write_bytes(b"old")
    (tmp_path / "file").write_text("not a folder")
    for out, message in ((lost, "folder is not empty (it holds checkpoints, privacy_ledger.json)"), (tmp_path / "file", "is a file")):
        assert main([command, "--dataset", "phantom", "--epsilon", "10", "--epochs" if command == "train" else "--rounds", "1",
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert sorted(p.name for p in lost.rglob("*")) == ["checkpoints", "ckpt_00002.pt", "privacy_ledger.json"]
    assert (lost / "privacy_ledger.json").read_text() == "{}"


def test_nan_is_refused_for_every_decimal_option_also_from_python():
    """The CLI and TOML readers refuse 'nan'; a RunConfig built in Python must not slip one past
    (a NaN noise limit kept the embedding gate shut without a word)."""
    for name in ("embedding_noise_limit", "epsilon", "lr_g"):
        with pytest.raises(FedPGGANError, match="must be a finite number"):
            RunConfig(**{name: float("nan")}).validate()
    assert RunConfig(embedding_noise_limit=float("inf"), epsilon=float("inf")).validate().dp is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--clients", "0"], "--clients 0 is invalid"),
        (["train", "--epochs", "0"], "--epochs 0 is invalid"),
        (["train", "--dataset", "/nonexistent/file.npz"], "/nonexistent/file.npz: no such file or folder"),
        (["train", "--class-prior", "0.5,x"], "--class-prior"),
        (["train", "--epsilon", "-1"], "--epsilon -1.0 is invalid"),
        (["simulate", "--clients", "3", "--min-clients", "5"], "--min-clients 5 exceeds --clients 3"),
        (["simulate", "--clients", "2", "--fraction", "0.5", "--min-clients", "2"],
         "--min-clients 2 exceeds the 1 site(s) that --fraction 0.5 selects of --clients 2"),
        # infinite clipping would make sigma * C infinite: NaN models certified as private
        (["train", "--max-grad-norm", "inf"], "--max-grad-norm inf is invalid: it must be a finite number"),
        (["train", "--lr-d", "inf"], "--lr-d inf is invalid"),
        (["simulate", "--partition", "quantity", "--alpha", "inf"], "--alpha inf is invalid"),
        (["simulate", "--seed", "-1"], "--seed -1 is invalid"),
        (["train", "--seed", str(2 ** 70)], "is invalid: it must be in 0 .. 2**63 - 1"),
        # values that ended in a traceback (memory, overflow) after the run folder was made
        (["train", "--embedding-frequencies", "100000000"], "--embedding-frequencies 100000000 is invalid: it must be in 1 .. 20000"),
        (["train", "--lr-d", "1e300"], "--lr-d 1e+300 is invalid: it must be at most 1"),
    ],
)
def test_bad_options_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_one_holder_of_all_the_data_is_refused_a_class_without_images(tmp_path, capsys):
    """Allowed at a deployed site (label skew); here no one holds an image of the class, so it cannot be learned."""
    import numpy as np
    from PIL import Image

    for name in ("normal", "pneumonia"):
        (tmp_path / "xrays" / name).mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((28, 28), 20 * i, np.uint8)).save(tmp_path / "xrays" / "normal" / f"{i}.png")
    assert main(["train", "--dataset", str(tmp_path / "xrays"), "--out", str(tmp_path / "run")]) == 2
    assert "xrays: class 'pneumonia' has no training images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["simulate", "--generator", "1"], ["train", "--epoch", "1"]])
def test_an_option_is_never_read_as_a_longer_one_it_abbreviates(argv, capsys):
    """An option removed since a command was written must fail as unknown, not run as another."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and err == f"error: unrecognized arguments: {' '.join(argv[1:])}; see fedpggan {argv[0]} --help"


PHANTOM_SIM = ["simulate", "--dataset", "phantom", "--clients", "2", "--rounds", "2", "--local-steps", "2"]
TOO_SMALL = ("--epsilon 0.01 with --embedding-share 0.5 leaves 0.005 for the embedding release, which the prv "
             "accountant certifies for no noise level up to 2000 at delta 1e-05; raise --epsilon or --embedding-share")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*PHANTOM_SIM, "--epsilon", "0.01"], TOO_SMALL),
        (["train", "--dataset", "phantom", "--epsilon", "0.01"], TOO_SMALL),
        ([*PHANTOM_SIM, "--image-size", "30"], "--image-size 30 is not supported"),
        (["train", "--dataset", "phantom", "--image-size", "30"], "--image-size 30 is not supported"),
        ([*PHANTOM_SIM, "--delta", "0.01"], "--delta 0.01 is not below 1/n"),
        ([*PHANTOM_SIM, "--client-cpus", "10000"], "--client-cpus 10000: more than the"),
        ([*PHANTOM_SIM, "--client-gpus", "64"], "--client-gpus 64: this machine has"),
        ([*PHANTOM_SIM, "--class-prior", "0.2,0.3,0.5"], "--class-prior has 3 weights but the dataset has 2 classes"),
        (["train", "--dataset", "phantom", "--epsilon", "10", "--delta", "0.5"], "--delta 0.5 is not below 1/n = 0.0005 for a site of 2000"),
        (["simulate", "--dataset", "phantom", "--clients", "2", "--rounds", "100", "--local-steps", "10",
          "--batch-size", "4096", "--epsilon", "0.05"],
         "keeps --rounds 100 x --local-steps 10 = 1000 DP-SGD steps of a site of 1000 images"),
    ],
)
def test_what_training_would_reject_is_refused_before_the_run_folder_is_made(argv, message, tmp_path, capsys):
    """Pre-flight: the budget and the image size fail in the user's options, before any folder
    (or Flower's engine, which the simulation would start first) exists."""
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_toml_config_and_flag_precedence(tmp_path, capsys):
    from fedpggan import config
    from fedpggan.cli import OneLineParser
    from simulation.run import OPTIONS, add_arguments

    toml = tmp_path / "c.toml"
    toml.write_text('clients = 7\nrounds = 3\nloss-rule = "mean"\n')
    parser = OneLineParser(prog="simulate")
    add_arguments(parser)
    cfg = config.resolve(parser.parse_args(["--config", str(toml), "--rounds", "9"]), OPTIONS)
    assert (cfg.clients, cfg.rounds, cfg.loss_rule) == (7, 9, "mean")  # the file over the defaults, the flag over the file
    assert config.resolve(parser.parse_args(["--config", str(toml)]), OPTIONS).rounds == 3
    toml.write_text("clientz = 7\n")
    assert main(["simulate", "--config", str(toml)]) == 2
    assert f"error: --config {toml}: unknown option 'clientz'; the keys are the option names" in capsys.readouterr().err
    toml.write_text("clients = [\n")
    assert main(["simulate", "--config", str(toml)]) == 2
    assert f"--config {toml}: invalid TOML" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--d-spectral-norm", "maybe"], "command line: option 'd-spectral-norm' = 'maybe' is not true or false"),
    (["train", "--config", "{toml}"], "option 'clients' does not apply to this command"),
    (["simulate", "--config", "{toml}", "--rounds", "x"], "option 'rounds' = 'x' is not a whole number"),
    (["simulate", "--epsilon", "abc"], "command line: option 'epsilon' = 'abc' is not a number, or 'none' for no DP"),
])
def test_an_option_that_would_be_misread_or_ignored_is_refused(argv, message, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text("clients = 3\n")
    assert main([a.format(toml=toml) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2  # without it: one line
    for argv in (["--debug", "audit", str(tmp_path)], ["audit", str(tmp_path), "--debug"],
                 ["site", "check", "--config", str(tmp_path / "site.toml"), "--debug"]):
        with pytest.raises(FedPGGANError):
            main(argv)


def test_flower_run_config_round_trip():
    cfg = RunConfig(epsilon=float("inf"), clients=4)
    back = RunConfig.from_flower(cfg.to_flower())
    assert back == cfg and not back.dp


@pytest.mark.parametrize("sites, records, epsilon, steps", [
    (5, 942, 10.0, 8),      # PneumoniaMNIST at eps 10: 8 steps keep its AUC and learn many-class data
    (5, 942, 1.0, 2),       # ... at eps 1 they learn D's noise (0.754 against 0.869)
    (5, 942, 3.0, 2),       # ... and at eps 3 (noise 0.018: 0.872 against 0.920)
    (5, 942, 2.0, 2),       # ... and at eps 2 (noise 0.026: 0.828 against 0.909)
    (3, 182, 10.0, 2),      # BreastMNIST's small sites at eps 10: the same (0.554 against 0.668)
    (5, 1000, 10.0, 8),     # the RGB phantom (0.81 -> 0.89 with 8)
    (5, 942, math.inf, 8),  # no DP
])
def test_generator_steps_follow_the_averaged_discriminators_noise(sites, records, epsilon, steps):
    """--g-steps 0 decides by the noise of the averaged DP discriminator's step, from public facts only."""
    from fedpggan.privacy.mechanism import run_d_noise, site_mechanism

    cfg = RunConfig(epsilon=epsilon, rounds=60, local_steps=8, delta=1e-5, clients=sites)
    noise = run_d_noise(cfg, [records] * sites, lambda n: site_mechanism(cfg, n, 480))
    assert cfg.g_steps == 0 and cfg.generator_steps(noise) == steps, noise
    assert RunConfig(g_steps=3).generator_steps(noise) == 3  # a number given wins


def test_the_generator_steps_a_run_took_are_read_from_its_record():
    from fedpggan.runs import recorded_generator_steps

    assert recorded_generator_steps({"generator_steps": {"per_round": 8}, "config": {"g-steps": 0}}) == 8
    assert recorded_generator_steps({"config": {"g-steps": 2}}) == 2  # runs before the choice was recorded
    assert recorded_generator_steps({"config": {"g-steps": 0}}) is None  # chosen, but not recorded: nobody knows


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


TINY = ["--dataset", "phantom", "--epsilon", "10", "--batch-size", "32", "--g-width", "16", "--d-width", "8",
        "--latent-dim", "16", "--embedding-frequencies", "20"]


def killed_after_first_checkpoint(out: Path, epochs: int) -> None:
    """``fedpggan train`` in a subprocess, SIGKILLed once its first checkpoint is indexed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedpggan.cli", "train", *TINY, "--epochs", str(epochs), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    index, deadline = out / "checkpoints" / "index.json", time.monotonic() + 300
    try:
        while not (index.exists() and json.loads(index.read_text() or "[]")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def trained_then_marked_running(out: Path, epochs: int) -> tuple[RunFolder, dict]:
    """A tiny completed run whose run.json says running again: the state a kill leaves, for the
    resume tests to damage further (they write the ledger's new hash with ``write_run``)."""
    assert main(["train", *TINY, "--epochs", str(epochs), "--out", str(out)]) == 0
    folder = RunFolder(out)
    info = folder.read_run()
    info["status"] = "running"
    return folder, info


def test_killed_centralised_run_audits_exports_and_resumes_to_the_uninterrupted_spend(tmp_path, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", *TINY, "--epochs", "3", "--out", str(whole)]) == 0
    killed_after_first_checkpoint(killed, 3)
    assert json.loads((killed / "run.json").read_text())["status"] == "running", "the run was not killed mid-way"
    # As it stands, the interrupted run's ledger is the one run.json vouches for: it audits and exports.
    assert main(["audit", str(killed)]) == 0
    assert main(["export", str(killed), "--out", str(tmp_path / "x"), "--n", "10"]) == 0
    sheet = json.loads((tmp_path / "x" / "datasheet.json").read_text())
    assert ("INCOMPLETE RUN: the source run's status is 'running' (stopped or interrupted before its planned end); "
            "the generator is the one of epoch 1.") in sheet["warnings"]
    capsys.readouterr()
    # Resume refuses other options, and the federated --resume names the right command.
    assert main(["train", "--resume", str(killed), "--epochs", "5"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(killed)]) == 2
    err = capsys.readouterr().err
    assert f"continue it with `fedpggan train --resume {killed}`" in err and "\n" not in err.strip()

    assert main(["train", "--resume", str(killed)]) == 0
    ledgers = [json.loads((run / "privacy_ledger.json").read_text()) for run in (whole, killed)]
    spend = [[{k: r[k] for k in ("round", "steps", "noise_multiplier", "sample_rate")} for r in ledger["sites"]["central"]["rounds"]]
             for ledger in ledgers]
    assert spend[1] == spend[0], "the resumed run took other steps than the uninterrupted one"
    eps = [[r["epsilon"] for r in ledger["sites"]["central"]["rounds"]] for ledger in ledgers]
    assert eps[1] == pytest.approx(eps[0], rel=1e-9) and ledgers[1]["guarantee"]["epsilon"] >= ledgers[0]["guarantee"]["epsilon"] - 1e-9
    assert [r["epoch"] for r in RunFolder(killed).read_metrics()] == [1, 2, 3]
    assert json.loads((killed / "run.json").read_text())["status"] == "completed"
    assert main(["audit", str(killed)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(killed)]) == 2
    assert "already completed" in capsys.readouterr().err


def test_resume_charges_epochs_lost_after_the_last_checkpoint_and_does_not_redo_them(tmp_path, capsys):
    """An epoch the ledger recorded was trained: its spend stays, so the resumed run starts after it."""
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 3)  # as if killed after epoch 2 was recorded but its checkpoint was lost
    folder.write_run(info)
    index = folder.checkpoint_index()
    (run / "checkpoints" / "index.json").write_text(json.dumps(index[:1]))
    ledger = json.loads(folder.ledger_json.read_text())
    ledger["sites"]["central"]["rounds"] = ledger["sites"]["central"]["rounds"][:2]
    ledger["checkpoints"] = ledger["checkpoints"][:1]
    folder.ledger_json.write_text(json.dumps(ledger))
    for entry in index[1:]:
        (run / "checkpoints" / entry["file"]).unlink()
    folder.write_run(info)  # the ledger's new hash
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--device", "cpu"]) == 0  # as on another machine: the device may change
    assert "epoch 2: trained after the newest verified checkpoint" in capsys.readouterr().out
    rounds = json.loads(folder.ledger_json.read_text())["sites"]["central"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert main(["audit", str(run)]) == 0  # epoch 3's checkpoint was written with --device cpu, run.json says auto
    info = folder.read_run()
    assert info["config"]["device"] == "auto" and info["resumed_with"] == {"device": "cpu"}
    info["status"] = "running"  # a later resume runs where the last one did, without repeating the option
    folder.write_run(info)
    from fedpggan.runs import config_to_resume
    assert config_to_resume(run, kind="centralised").device == "cpu"


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_and_damaged_run_files_are_one_line_errors(tmp_path, capsys):
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 2)
    folder.write_run(info)
    with open(folder.metrics_jsonl, "a") as f:
        f.write('{"epoch": 3, "d_lo')  # a kill (or a full disk) mid-append
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0  # the resume was refused with a traceback before
    assert "last line is cut short" in capsys.readouterr().err
    assert [r["epoch"] for r in folder.read_metrics()] == [1, 2]  # completed: nothing left to redo
    folder.metrics_jsonl.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')  # damage inside: not a kill's
    with pytest.raises(FedPGGANError, match="line 2 is not JSON"):
        folder.read_metrics()

    other = tmp_path / "other"
    folder, info = trained_then_marked_running(other, 2)
    del info["config"]
    folder.write_run(info)
    capsys.readouterr()
    assert main(["train", "--resume", str(other)]) == 2
    err = capsys.readouterr().err
    assert "has no 'config'" in err and "\n" not in err.strip()
    info = folder.read_run()
    folder.ledger_json.write_text("[]")  # a ledger that is no ledger, with run.json vouching for it
    folder.write_run(info)
    with pytest.raises(FedPGGANError, match="not a privacy ledger"):
        folder.usable_checkpoints()


def test_resume_refuses_a_run_whose_data_or_options_changed_or_whose_ledger_is_gone(tmp_path, capsys):
    """The resumed epochs must spend under the mechanism the ledger registered, not a new calibration."""
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 2)
    spent = json.loads(folder.ledger_json.read_text())["guarantee"]["epsilon"]
    info["config"]["epochs"] = 4  # run.json edited: twice the steps the noise was calibrated for
    folder.write_run(info)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the run's ledger registered" in err and "changed since the run started" in err and "\n" not in err
    assert json.loads(folder.ledger_json.read_text())["guarantee"]["epsilon"] == spent  # nothing more was spent
    folder.ledger_json.unlink()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "privacy_ledger.json: missing" in err and "a resume needs" in err and "\n" not in err


def test_a_resume_past_a_corrupt_checkpoint_warns_once_and_the_ledger_says_what_it_discarded(tmp_path, capsys):
    """A resume that falls back to an older checkpoint marks the newer ones discarded in the ledger,
    so the audit can tell them from a file deleted behind the trainer's back."""
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 3)  # as if killed after epoch 3 was recorded and checkpointed
    folder.write_run(info)
    (run / "checkpoints" / "ckpt_00003.pt").write_bytes(b"truncated")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.count("ckpt_00003.pt (round 3): missing or hash mismatch") == 1, err
    assert (run / "checkpoints" / "ckpt_00003.pt.discarded").read_bytes() == b"truncated"
    assert [e["round"] for e in folder.checkpoint_index()] == [1, 2]
    ledger = json.loads(folder.ledger_json.read_text())
    assert [("discarded" in c) for c in ledger["checkpoints"]] == [False, False, True]
    assert [r["round"] for r in ledger["sites"]["central"]["rounds"]] == [1, 2, 3]  # epoch 3 stays charged
    assert main(["audit", str(run)]) == 0
    rows = json.loads((run / "audit.json").read_text())["checkpoints"]
    assert rows[2]["status"].startswith("discarded (missing or failing its hash at the resume of")
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--n", "10"]) == 0
    assert json.loads((tmp_path / "x" / "datasheet.json").read_text())["generator"]["round"] == 2

    (run / "checkpoints" / "ckpt_00003.pt").write_bytes(b"another model")  # put in the discarded one's place
    assert main(["audit", str(run)]) == 1
    (run / "checkpoints" / "ckpt_00003.pt").unlink()
    (run / "checkpoints" / "ckpt_00002.pt").unlink()  # deleted by hand afterwards: still a failure
    assert main(["audit", str(run)]) == 1


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 1)  # as if stopped before its first checkpoint: no list holds one
    ledger = json.loads(folder.ledger_json.read_text())
    ledger["checkpoints"] = []
    folder.ledger_json.write_text(json.dumps(ledger))
    folder.write_run(info)
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "stopped before its first one, so there is nothing to resume; start a new run" in err and "\n" not in err
    (run / "checkpoints" / "ckpt_00001.pt").write_bytes(b"x")  # written as it stopped, before anything listed it
    assert main(["train", "--resume", str(run)]) == 2
    assert "stopped before its first one" in capsys.readouterr().err


def test_the_ledger_vouches_for_checkpoints_the_index_missed_and_not_for_ones_slipped_into_it(tmp_path, capsys):
    """A kill between the ledger's entry for a checkpoint and the index's leaves a valid checkpoint
    only the ledger lists: it is used. A file added to the index that the ledger does not list is not."""
    folder, info = trained_then_marked_running(tmp_path / "run", 2)
    folder.write_run(info)
    index = folder.checkpoint_index()
    (folder.checkpoints / "index.json").write_text(json.dumps(index[:1]))  # as if killed before the index listed epoch 2
    assert folder.latest_checkpoint()[1]["round"] == 2
    assert main(["train", "--resume", str(folder.root)]) == 0  # nothing left to train; epoch 2's weights are kept
    assert [e["round"] for e in folder.checkpoint_index()] == [1, 2] and folder.checkpoint_path(2).is_file()
    assert not any("discarded" in c for c in json.loads(folder.ledger_json.read_text())["checkpoints"])
    assert main(["audit", str(folder.root)]) == 0

    foreign = folder.checkpoint_path(9)
    foreign.write_bytes(folder.checkpoint_path(1).read_bytes() + b"other")  # another model slipped into the index
    (folder.checkpoints / "index.json").write_text(json.dumps(index + [{"round": 9, "file": foreign.name,
                                                                         "sha256": sha256_file(foreign)}]))
    assert folder.latest_checkpoint()[1]["round"] == 2
    assert main(["audit", str(folder.root)]) == 1  # a completed run's unlisted file: not this trainer's

    # The newest checkpoint replaced and its index entry edited to the new hash: the ledger's hash
    # still binds round 2, so export refuses it instead of quietly taking round 1.
    folder.checkpoint_path(2).write_bytes(b"garbage")
    (folder.checkpoints / "index.json").write_text(json.dumps([index[0], {**index[1], "sha256": sha256_file(folder.checkpoint_path(2))}]))
    assert [e["round"] for e in folder.usable_checkpoints()] == [1, 2]
    assert main(["export", str(folder.root), "--out", str(tmp_path / "x"), "--n", "10", "--allow-unaudited"]) == 2
    assert "the newest checkpoint (round 2) is missing or fails its hash check" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (folder.checkpoints / "index.json").unlink()
    folder.ledger_json.write_text(folder.ledger_json.read_text().replace('"central"', '"edited"'))
    with pytest.raises(FedPGGANError, match="index.json: missing, and the ledger does not match"):
        folder.latest_checkpoint()  # lost index, edited ledger: nothing vouches for any checkpoint


@pytest.mark.parametrize("stop", ["before the ledger is written", "after the ledger is written"])
def test_a_run_stopped_inside_a_ledger_write_still_audits_and_resumes(tmp_path, capsys, monkeypatch, stop):
    """run.json names the ledger's new hash (and the one it replaces) before the ledger is written,
    so whichever write a kill interrupts, the ledger on disk is one run.json vouches for."""
    import fedpggan.runs as runs

    run, calls = tmp_path / "run", {"n": 0}

    def interrupt_fifth(write):
        def wrapped(*args, **kwargs):
            if write is runs.atomic_write_bytes and Path(args[0]) != RunFolder(run).ledger_json:
                return write(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 5:  # epoch 2, once epoch 1 is checkpointed
                raise KeyboardInterrupt
            return write(*args, **kwargs)
        return wrapped

    if stop == "before the ledger is written":
        monkeypatch.setattr(runs, "atomic_write_bytes", interrupt_fifth(runs.atomic_write_bytes))
    else:
        monkeypatch.setattr(RunFolder, "write_run", interrupt_fifth(RunFolder.write_run))
    assert main(["train", *TINY, "--epochs", "3", "--out", str(run)]) == 130  # as Ctrl-C would
    assert calls["n"] == 5
    monkeypatch.undo()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "running" and info["ledger_sha256_before"] is not None, "not stopped inside a ledger write"
    assert main(["audit", str(run)]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    assert "ledger_sha256_before" not in json.loads((run / "run.json").read_text())
    assert main(["audit", str(run)]) == 0


def test_a_run_still_training_is_not_resumed_by_a_second_process(tmp_path, capsys):
    """Two trainers of one folder would each take the same epochs with their own noise, and the ledger
    they share would charge them once: the second is refused while the first holds the run."""
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 2)
    folder.write_run(info)
    before = folder.ledger_json.read_bytes()
    capsys.readouterr()
    with folder.held():  # the first trainer, still at work
        assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "another process is training a run in this folder" in err and "\n" not in err.strip()
    assert folder.ledger_json.read_bytes() == before  # nothing written by the refused one
    assert main(["train", "--resume", str(run), "--device", "cpu"]) == 0  # once free; --device may change on a resume


def test_a_resume_with_other_training_data_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 2)
    assert info["dataset"]["sha256"]  # recorded at the start
    info["dataset"]["sha256"] = "0" * 64  # as if the files at the run's data path were replaced since
    folder.write_run(info)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert "the training data differ from those the run began with" in capsys.readouterr().err
    del info["dataset"]["sha256"]  # a run from before the hash: it cannot check other paths
    folder.write_run(info)
    assert main(["train", "--resume", str(run), "--data-dir", str(tmp_path)]) == 2
    assert "recorded no content hash of its data" in capsys.readouterr().err


def test_a_run_whose_last_epoch_lost_its_weights_completes_and_its_export_says_so(tmp_path, capsys):
    """Killed after the last epoch was charged but before its checkpoint: no epoch is left, so the run
    completes with the previous epoch's weights, and the datasheet does not pass them off as the last."""
    run = tmp_path / "run"
    folder, info = trained_then_marked_running(run, 2)
    index = folder.checkpoint_index()
    (run / "checkpoints" / "index.json").write_text(json.dumps(index[:1]))
    ledger = json.loads(folder.ledger_json.read_text())
    ledger["checkpoints"] = ledger["checkpoints"][:1]
    folder.ledger_json.write_text(json.dumps(ledger))
    (run / "checkpoints" / index[1]["file"]).unlink()
    folder.write_run(info)  # the ledger's new hash
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "no epoch is left to train: the run completes with epoch 1's weights" in capsys.readouterr().out
    assert folder.read_run()["status"] == "completed"
    assert main(["audit", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--n", "10"]) == 0
    warnings = json.loads((tmp_path / "x" / "datasheet.json").read_text())["warnings"]
    assert any(w.startswith("EARLIER GENERATOR: the run trained 2 epochs; this generator is the one of epoch 1") for w in warnings)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    import datetime as real

    import fedpggan.runs as runs

    class Frozen(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2026, 12, 6, 12, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "datetime", Frozen)
    first = runs.default_run_dir()
    first.mkdir(parents=True)
    second = runs.default_run_dir()
    assert (first.name, second.name) == ("20261206-120000", "20261206-120000-2")


def test_command_line_defaults_are_the_option_classes_defaults():
    """The commands keep their own defaults so that `fedpggan --help` starts without torch; they must say
    what the classes that do the work would do when called from Python."""
    import argparse
    import inspect

    from fedpggan.audit.mia import MiaOptions
    from fedpggan.cli import build_parser
    from fedpggan.evaluation.classifier import TrainingBudget
    from fedpggan.evaluation.suite import evaluate_run
    from fedpggan.export.options import DEFAULT_N, ExportOptions
    from fedpggan.runs import RunFolder

    parser = build_parser()
    export, options = parser.parse_args(["export", "RUN", "--out", "X"]), ExportOptions()
    assert (export.seed, export.device, export.chunk_size) == (options.seed, options.device, options.chunk_size)
    assert export.split == "1" and options.split == (1.0, 0.0, 0.0)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    n_help = next(a.help for a in commands["export"]._actions if a.dest == "n")
    assert n_help.endswith(f"(default {DEFAULT_N})")
    audit, mia = parser.parse_args(["audit", "RUN"]), MiaOptions()
    assert (audit.mia_records, audit.synthetic, audit.bootstraps, audit.device, audit.seed) == (
        mia.max_records, mia.synthetic, mia.bootstraps, mia.device, mia.seed)
    evaluate = parser.parse_args(["evaluate", "RUN"])
    assert evaluate.batch_size == TrainingBudget().batch_size
    assert inspect.signature(evaluate_run).parameters["device"].default == evaluate.device
    assert inspect.signature(RunFolder).parameters["keep_checkpoints"].default == RunConfig().keep_checkpoints
