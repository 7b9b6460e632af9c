"""A real Flower simulation (Ray) of 3 sites x 2 rounds, and what crosses the wire."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.simulation import run_simulation

import fedpggan.data.sources as sources
from client.client_app import app as client_app
from fedpggan.build import open_training_data
from fedpggan.data import ImageDataset
from fedpggan.wire import PRIVACY_METRICS, PUBLIC_SITE_FACTS
from pggan_model import GeneratorTrainer
from server.federated_run import FederatedRun
from simulation.run import prepare

from conftest import tiny_config

STATUS_KEYS = {"status", "site-id", "replayed", "recovered", "t-compute"}


class RecordingGrid:
    """Delegates to Flower's Grid and keeps every reply: exactly what the sites sent."""

    def __init__(self, grid, replies):
        self.grid, self.replies = grid, replies

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def simulate_recorded(out, **overrides):
    """Simulate 3 sites x 2 rounds; the server side runs in this process, with data loading forbidden.
    Returns every reply the sites sent and every generator step's arguments."""
    from flwr.serverapp import ServerApp

    cfg, _ = prepare(tiny_config(out, **overrides))
    replies, g_calls = [], []
    patch = pytest.MonkeyPatch()

    def no_data(*args, **kwargs):
        raise AssertionError("the server process opened a dataset")

    original_step = GeneratorTrainer.step

    def recording_step(self, batch_size, prior=None):
        g_calls.append((batch_size, prior))
        return original_step(self, batch_size, prior)

    for reader in ("open_phantom", "load_npz", "load_folder"):  # every dataset is opened through one of these
        patch.setattr(sources, reader, no_data)
    patch.setattr(ImageDataset, "__init__", no_data)  # and held in one, however it was read
    patch.setattr(GeneratorTrainer, "step", recording_step)
    app = ServerApp()

    @app.main()
    def main(grid, context):
        FederatedRun(RecordingGrid(grid, replies), dataclasses.replace(cfg, out=str(out))).run()

    try:
        with pytest.raises(AssertionError, match="opened a dataset"):  # the guard holds for the product's own loader
            open_training_data(cfg)
        run_simulation(server_app=app, client_app=client_app, num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"include_dashboard": False}})
    finally:
        patch.undo()
    return replies, g_calls


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    return (out, *simulate_recorded(out, epsilon=10.0))


def test_run_folder_is_complete_and_within_budget(simulated):
    out, _, _ = simulated
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["reason"] == "2 rounds done", run
    assert run["kind"] == "federated" and run["num_sites"] == 3
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert set(ledger["sites"]) == {"0", "1", "2"}
    for site in ledger["sites"].values():
        assert [r["round"] for r in site["rounds"]] == [1, 2]
        assert 0 < site["epsilon"] <= 10.0
    assert ledger["guarantee"]["epsilon"] == max(s["epsilon"] for s in ledger["sites"].values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["accepted"] == 3 for r in rows)
    assert {"loss_g1", "loss_g2", "case_neither", "case_only_g1", "case_only_g2", "case_both", "epsilon_max",
            "t_sites", "t_server"} <= set(rows[-1])
    trained = [r for r in rows if "loss_g1" in r]
    assert trained and all("embedding_noise_ratio" in r for r in trained)
    saved = run["config"]
    for r in trained:  # the gate on --embedding-steps follows the logged estimate of the release's noise
        clean = r["embedding_noise_ratio"] is not None and r["embedding_noise_ratio"] <= saved["embedding-noise-limit"]
        assert r["g_steps"] == saved["g-steps"] == run["generator_steps"]["per_round"] == 1  # conftest's tiny runs pin it
        assert r["embedding_steps"] == (saved["g-steps"] * saved["embedding-steps"] if clean else 0)
    for name in ("samples/round_00002.png", "curves/training.png", "curves/epsilon.png"):
        assert (out / name).stat().st_size > 0, name
    for site in ("0", "1", "2"):  # each site's accountant state persisted on its side
        state = json.loads((out / "sites" / f"site_{site}" / out.name / "site_state.json").read_text())
        release, *dp_sgd = state["history"]  # the one-shot embedding release comes first
        assert release == [state["release_noise"], 1.0, 1]
        assert sum(steps for _, _, steps in dp_sgd) == 4


def test_the_partition_summary_pins_each_sites_records_by_hash(tmp_path):
    """What partition.json holds, so a resume and the audit can refuse data that split otherwise."""
    cfg, summary = prepare(tiny_config(tmp_path / "run"))
    assert len(summary) == cfg.clients and len({r["sha256"] for r in summary}) == cfg.clients
    assert all(len(r["sha256"]) == 64 and r["n"] > 0 for r in summary)


def test_no_raw_data_crosses_the_wire(simulated):
    _, replies, _ = simulated
    queries = [r for r in replies if "site" in r.content]
    trains = [r for r in replies if "d" in r.content]
    assert len(queries) == 3 and len(trains) == 6
    for reply in queries:
        assert set(reply.content.keys()) == {"site"}
        assert set(reply.content["site"].keys()) == set(PUBLIC_SITE_FACTS)
    for reply in trains:
        assert set(reply.content.keys()) == {"d", "privacy", "status", "embedding"}
        # the one-shot DP release: a noisy (features + 1) x classes sum, not per-record data
        assert reply.content["embedding"].to_torch_state_dict()["sum"].shape == (2 * 500 + 1, 2)
        assert isinstance(reply.content["d"], ArrayRecord)
        assert isinstance(reply.content["privacy"], MetricRecord)
        assert isinstance(reply.content["status"], ConfigRecord)
        assert set(reply.content["privacy"].keys()) <= set(PRIVACY_METRICS)
        assert set(reply.content["status"].keys()) <= STATUS_KEYS
        for name, array in reply.content["d"].to_torch_state_dict().items():
            assert name.split(".")[0] in ("features", "head", "embed"), name
            assert tuple(array.shape[-2:]) != (28, 28), f"{name} has an image's shape"


def test_generator_training_never_sees_real_data(simulated):
    _, _, g_calls = simulated
    # The server process could not open any dataset (the fixture forbids it), and each
    # generator step received only a batch size and the public prior.
    assert len(g_calls) == 2
    assert all(isinstance(b, int) and prior is None for b, prior in g_calls)


def test_resume_of_a_run_saved_before_a_default_changed_keeps_the_setting_it_trained_with(tmp_path, monkeypatch):
    import flwr.simulation

    import server.server_app
    import simulation.run as sim_run
    from fedpggan.config import SAVED_BEFORE_DEFAULT_CHANGED, RunConfig
    from fedpggan.runs import RunFolder

    saved = {k: v for k, v in RunConfig(dataset="phantom").to_flower().items() if k not in SAVED_BEFORE_DEFAULT_CHANGED}
    (tmp_path / "run.json").write_text(json.dumps({"kind": "federated", "status": "running", "config": saved}))
    monkeypatch.setattr(RunFolder, "checkpoint_index", lambda self: [{"round": 1, "file": "ckpt.pt"}])
    monkeypatch.setattr(RunFolder, "latest_checkpoint", lambda self, warn=True: (tmp_path / "ckpt.pt", {}))
    seen = {}
    monkeypatch.setattr(server.server_app, "make_server_app", lambda cfg, resume: seen.update(cfg=cfg, resume=resume))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: None)
    with pytest.raises(sim_run.FedPGGANError, match="ended with status 'running'"):  # nothing ran: no completion
        sim_run.simulate(None, resume=str(tmp_path))
    assert seen["resume"] and seen["cfg"].fake_gradients == SAVED_BEFORE_DEFAULT_CHANGED["fake-gradients"] == "clipped"
    assert seen["cfg"].embedding_count_share == SAVED_BEFORE_DEFAULT_CHANGED["embedding-count-share"] == 0.5


def test_a_secure_release_reaches_the_server_only_as_the_sum_of_all_sites(tmp_path):
    import torch

    out = tmp_path / "run"
    replies, _ = simulate_recorded(out, epsilon=1.0, release_aggregation="secure")
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    keys = [r for r in replies if "key" in r.content]
    masked = [r for r in replies if "masked" in r.content]
    trains = [r for r in replies if "d" in r.content]
    assert len(keys) == len(masked) == 3 and len(trains) == 6
    assert all("embedding" not in r.content for r in trains)  # a share never rides on a round reply
    shares = [torch.load(p, weights_only=True).double() for p in sorted((out / "sites").glob("site_*/run/embedding_release.pt"))]
    pooled = torch.load(out / "secure_release_sum.pt", weights_only=True)
    assert len(shares) == 3 and torch.allclose(pooled, sum(shares), atol=1e-6, rtol=0)
    for reply, share in zip(sorted(masked, key=lambda r: r.metadata.src_node_id), shares):
        sent = reply.content["masked"].to_torch_state_dict()["sum"]
        assert sent.dtype == torch.int64 and not torch.allclose(sent.double() / 2**24, share.flatten(), atol=1.0)
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert any("summed securely" in a for a in ledger["assumptions"])  # what `fedpggan audit` lists for the officer
    for site_id, site in ledger["sites"].items():
        release = site["feature_release"]
        assert release["aggregation"] == "secure" and release["sites"] == 3
        assert release["share_noise_multiplier"] == pytest.approx(release["noise_multiplier"] / 3**0.5)
        assert site["epsilon"] <= 1.0 < release["epsilon_if_all_other_sites_collude"]
        assert release["key_list"]["verified"] is False  # a simulated site has no roster of peer keys
        state = json.loads((out / "sites" / f"site_{site_id}" / "run" / "site_state.json").read_text())
        assert state["history"][0] == [release["noise_multiplier"], 1.0, 1] and state["release_share_of"] == 3
        assert not (out / "sites" / f"site_{site_id}" / "run" / "secure_release.key").exists()  # one use, then gone
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the gate read the pooled sum, with the noise of one whole release per site pooled (sigma^2 / 3 per share)
    from fedpggan.privacy.ledger import finite_or_none
    from pggan_model.mean_embedding import release_noise_ratio

    saved = json.loads((out / "run.json").read_text())["config"]
    variance = sum(s["feature_release"]["noise_multiplier"] ** 2 for s in ledger["sites"].values()) / 3
    expected = finite_or_none(release_noise_ratio(pooled, saved["embedding-count-share"], variance))
    assert all(r["embedding_noise_ratio"] == pytest.approx(expected) for r in rows)
    from fedpggan.audit import audit_run

    audit = audit_run(out)
    assert audit["passed"]
    worst = {site: release["epsilon_if_all_other_sites_collude"] for site, release in
             ((s, v["feature_release"]) for s, v in ledger["sites"].items())}
    for site, value in worst.items():  # the audit recomputes the worst case on its own and says so
        note = next(n for n in audit["notes"] if n.startswith(f"sites.{site}: the embedding release was summed securely"))
        assert f"{value:.4g}" in note and "took the server's key list on trust" in note


def test_weighted_aggregation_weighs_each_sites_discriminator_by_its_public_record_count(tmp_path, capsys):
    """--aggregation weighted: the global D is the count-weighted mean of the sites' replies, and the
    generator-step rule reads the noise of that weighted mean (under DP a small site's D is the noisy one)."""
    import torch

    from fedpggan.privacy.mechanism import averaged_d_noise
    from fedpggan.runs import RunFolder
    from pggan_model.checkpoint import read_checkpoint

    out = tmp_path / "run"
    replies, _ = simulate_recorded(out, epsilon=10.0, aggregation="weighted", partition="quantity", alpha=0.5, g_steps=0)
    sizes = {r.metadata.src_node_id: int(r.content["site"]["num-records"]) for r in replies if "site" in r.content}
    assert sorted(sizes.values()) == [11, 133, 1856]  # the quantity split gives the sites different sizes
    printed = capsys.readouterr().out  # the 11-image site, below --batch-size 32, is named
    assert "warning: site(s) 0 (11 images) hold no more than --batch-size 32 images" in printed
    assert "--aggregation weighted counts" not in printed  # the hint is for equal-weight runs
    ledger_text = (out / "privacy_ledger.json").read_text()
    assert "weights each site's discriminator by its public record count" in ledger_text and "equal weights" not in ledger_text
    last = [r for r in replies if "d" in r.content and r.metadata.group_id == "2"]
    assert len(last) == 3
    counts = torch.tensor([float(sizes[r.metadata.src_node_id]) for r in last], dtype=torch.float64)
    states = [r.content["d"].to_torch_state_dict() for r in last]
    path, _ = RunFolder(out).latest_checkpoint()
    saved = {k[2:]: v for k, v in read_checkpoint(path)["state_dict"].items() if k.startswith("d.")}
    for key, value in saved.items():
        stacked = torch.stack([s[key].double() for s in states])
        weighted = torch.tensordot(counts / counts.sum(), stacked, dims=1)
        assert torch.allclose(value.double(), weighted, atol=1e-6, rtol=1e-5), key
        if value.numel() > 1:
            assert not torch.allclose(value.double(), stacked.mean(0), atol=1e-6, rtol=1e-5), key  # not the equal-weight mean
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    mechanisms = [(SimpleNamespace(noise_multiplier=s["noise_multiplier"], sample_rate=s["sample_rate"]), s["public_num_records"])
                  for s in ledger["sites"].values()]
    chosen = json.loads((out / "run.json").read_text())["generator_steps"]
    assert chosen["averaged_d_noise"] == pytest.approx(averaged_d_noise(mechanisms, 3, weighted=True))
    assert chosen["averaged_d_noise"] < averaged_d_noise(mechanisms, 3)


@pytest.mark.parametrize("release", ["plain", "secure"])
def test_a_site_fraction_never_selects_has_spent_only_what_it_released(tmp_path, release):
    from fedpggan.audit import audit_run
    from fedpggan.privacy import epsilon_of
    from fedpggan.privacy.feature_release import release_history

    out = tmp_path / "run"
    simulate_recorded(out, epsilon=10.0, fraction=0.3, release_aggregation=release)  # one site of 3 per round
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    idle = [s for s in ledger["sites"].values() if not s["rounds"]]
    assert idle and all({e["event"] for e in s["events"]} == {"not_selected"} for s in idle)
    for site in idle:
        sigma = site["feature_release"]["noise_multiplier"]
        # a plain release rides on a site's first round; a secure one is made by every site before round 1
        spent = epsilon_of(release_history(sigma), site["delta"], site["accountant"]) if release == "secure" else 0.0
        assert site["epsilon"] == pytest.approx(spent)
    audit = audit_run(out)
    assert audit["passed"], audit
    # a site dropped from the ledger (and the ledger's hash updated to match) would drop its spend unnoticed
    from fedpggan.io import sha256_file

    dropped = next(s for s, v in ledger["sites"].items() if v["rounds"])
    del ledger["sites"][dropped]
    (out / "privacy_ledger.json").write_text(json.dumps(ledger))
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "ledger_sha256": sha256_file(out / "privacy_ledger.json")}))
    audit = audit_run(out)
    assert not audit["passed"] and any(f"site(s) {dropped} of run.json have no ledger entry" in v["reason"]
                                       for v in audit["violations"])


def test_flower_log_lines_are_printed_once_and_without_debug():
    """Opacus installs a root log handler at import; Flower's lines must not reach it as well."""
    import subprocess
    import sys

    code = ("import logging, opacus, fedpggan.privacy; from flwr.common.logger import log; "
            "log(logging.DEBUG, 'debug-marker'); log(logging.INFO, 'info-marker')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "debug-marker" not in output
    assert output.count("info-marker") == 1


def test_a_second_server_of_a_run_still_training_is_refused_before_it_asks_any_site(tmp_path):
    """Its rounds would be charged at the sites a second time under the one ledger."""
    from fedpggan.errors import FedPGGANError
    from fedpggan.runs import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    with folder.held(), pytest.raises(FedPGGANError, match="another process is training a run in this folder"):
        FederatedRun(None, tiny_config(tmp_path / "run"), resume=True).run()  # no grid: it must stop before using one
    folder.create()  # the lock a failed trainer leaves (e.g. no site connected) does not block a new run there


def test_the_simulation_mark_does_not_outlive_the_simulation(tmp_path, monkeypatch):
    """Sites may derive noise keys from --seed only inside a simulation: the mark is gone afterwards,
    also after a failed one, so a later site in the same process is not taken for a simulated one."""
    import simulation.run as sim

    monkeypatch.delenv("FEDPGGAN_SIMULATION", raising=False)
    seen = []

    def failing_simulation(**_):
        seen.append(os.environ.get("FEDPGGAN_SIMULATION"))
        raise RuntimeError("a site failed")

    monkeypatch.setattr("flwr.simulation.run_simulation", failing_simulation)
    with pytest.raises(RuntimeError, match="a site failed"):
        sim.simulate(tiny_config(tmp_path / "run", rounds=1))
    assert seen == ["1"] and "FEDPGGAN_SIMULATION" not in os.environ
    monkeypatch.setenv("FEDPGGAN_SIMULATION", "0")  # an operator's own value is restored, not dropped
    with sim.simulation_marked():
        assert os.environ["FEDPGGAN_SIMULATION"] == "1"
    assert os.environ["FEDPGGAN_SIMULATION"] == "0"


def test_a_stopped_simulation_exits_with_its_own_code_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    import simulation.run as sim

    (tmp_path / "run.json").write_text(json.dumps({"status": "stopped"}))
    monkeypatch.setattr(sim, "simulate", lambda cfg, resume=None, changes=None: tmp_path)
    assert sim.main(["--dataset", "phantom"]) == sim.STOPPED_EXIT_CODE == 3
    assert f"continue it with --resume {tmp_path}" in capsys.readouterr().err
    (tmp_path / "run.json").write_text(json.dumps({"status": "completed"}))
    assert sim.main(["--dataset", "phantom"]) == 0


def test_a_resume_may_move_the_data_and_the_device_but_change_nothing_else(tmp_path, capsys):
    import simulation.run as sim

    assert sim.main(["--resume", str(tmp_path / "nowhere"), "--rounds", "3"]) == 2
    assert "drop --rounds" in capsys.readouterr().err
    assert sim.main(["--resume", str(tmp_path / "nowhere"), "--device", "cpu", "--data-dir", str(tmp_path)]) == 2
    assert "run.json: not found" in capsys.readouterr().err  # past the option check, to the missing run


@pytest.mark.parametrize("stop, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_ctrl_c_or_sigterm_ends_a_simulation_at_once_keeping_what_it_saved(tmp_path, stop, code):
    """Flower's runtime blocks the main thread in a join a Ctrl-C cannot end, and its ServerApp thread holds the
    exit until a round times out: the runner must still stop within seconds, with the signal's exit code."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    log = tmp_path / "log"
    with log.open("w") as out:
        # Ctrl-C's handler as a terminal leaves it: a background job (CI's `nohup ... &`) inherits SIGINT ignored
        as_from_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
        sim = subprocess.Popen([sys.executable, "-c", as_from_a_terminal, "simulation/run.py", "--dataset", "phantom",
                                "--clients", "2", "--rounds", "50", "--local-steps", "1", "--g-width", "16", "--d-width", "8",
                                "--latent-dim", "16", "--epsilon", "none", "--out", str(tmp_path / "run")],
                               cwd=REPO, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 300
            while "rounds:" not in log.read_text() and time.monotonic() < deadline and sim.poll() is None:
                time.sleep(1)  # the round loop has begun: Flower's runtime is running
            time.sleep(5)
            sim.send_signal(getattr(signal, stop))
            assert sim.wait(timeout=60) == code
        finally:
            sim.kill()
    assert "interrupted: what was saved is kept" in log.read_text()
    assert "SIGTERM handler is not set" not in log.read_text()  # Ray's warning about the handler the runner sets
    assert json.loads((tmp_path / "run" / "run.json").read_text())["kind"] == "federated"  # the folder stays
