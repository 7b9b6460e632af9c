"""Crashes, hostile sites and bad input: a killed run resumes to the same result, broken or
hostile updates cannot wreck D, and every bad input is one line with nothing lost."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, fix_today, tiny_config
from fedpggan.cli import main
from fedpggan.config import RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.io import sha256_file
from fedpggan.runs import RunFolder
from server.aggregation import aggregate
from server.validation import MAX_RELATIVE_UPDATE, reply_problem, update_norm, update_problem
from simulation.faults import kill_hard, round_in_flight, start_killable
from simulation.run import prepare, simulate

TIMING = ("t_sites", "t_server", "t_round", "t_site_compute")


# --- kill -9 mid-round, resume, compare with an uninterrupted run --------------------------
def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(RunFolder(run).latest_checkpoint()[0], weights_only=False)["state_dict"]


def comparable_metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING and k != "events"}
            for row in RunFolder(run).read_metrics()]


def site_rounds(run: Path) -> dict[str, list]:
    """Each site's spend as the ledger records it (a round's ``replayed`` flag aside)."""
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    return {s: (v["epsilon"], [{k: x for k, x in r.items() if k != "replayed"} for r in v["rounds"]])
            for s, v in ledger["sites"].items()}


@pytest.mark.parametrize("aggregation", ["plain", "secure"])  # secure: the resumed run reuses the sum, not a new one
def test_killed_mid_round_resumes_to_the_same_result(tmp_path, aggregation):
    # --noise-key seed: two runs can be compared bit for bit only if their sites draw the same noise
    base = tiny_config(tmp_path / "whole", epsilon=10.0, rounds=5, release_aggregation=aggregation, noise_key="seed")
    simulate(base)
    killed = tmp_path / "killed"
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    proc = start_killable(dataclasses.replace(base, out=str(killed)), ray_tmp)
    try:
        deadline = time.monotonic() + 300
        while not round_in_flight(killed, 3) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        kill_hard(proc, ray_tmp)
    assert json.loads((killed / "run.json").read_text())["status"] == "running", "the run was not killed mid-way"
    assert len(RunFolder(killed).read_metrics()) < 5

    simulate(None, resume=str(killed))

    assert json.loads((killed / "run.json").read_text())["status"] == "completed"
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(killed)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "resumed weights differ"
    assert comparable_metrics(killed) == comparable_metrics(tmp_path / "whole")
    assert site_rounds(killed) == site_rounds(tmp_path / "whole"), "a site re-spent or forgot budget"
    events = [e["event"] for s in json.loads((killed / "privacy_ledger.json").read_text())["sites"].values()
              for e in s["events"]]
    # the in-flight round is explained (a cached reply re-sent, or recomputed under its reservation), never charged twice
    assert events and set(events) <= {"replayed", "recovered"}, events


def test_a_resume_keeps_the_spend_recorded_after_its_checkpoint(tmp_path, monkeypatch):
    """With --checkpoint-every 2 a kill after round 3 is in the ledger resumes from round 2's
    checkpoint and redoes round 3. Sites that crash in the redone round spent round 3 all the same:
    the ledger must keep that spend (the checkpoint's snapshot of the ledger did not have it)."""
    from fedpggan.audit.runner import audit_run
    from simulation.faults import app as faulty_sites

    cfg = tiny_config(tmp_path / "run", epsilon=10.0, rounds=4, clients=3, checkpoint_every=2, noise_key="seed")
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    proc = start_killable(cfg, ray_tmp)
    run = Path(cfg.out)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and len(RunFolder(run).read_metrics()) < 3:
            time.sleep(0.02)
    finally:
        kill_hard(proc, ray_tmp)
    at_kill = json.loads((run / "privacy_ledger.json").read_text())["sites"]
    assert all([r["round"] for r in s["rounds"]][-1] == 3 for s in at_kill.values()), "not killed after round 3"

    monkeypatch.setenv("FEDPGGAN_FAULT_DROP", "1.0")  # every site but partition 0 crashes from now on
    monkeypatch.setenv("FEDPGGAN_FAULT_MODES", "none")
    simulate(None, resume=str(run), client_app=faulty_sites)

    after = json.loads((run / "privacy_ledger.json").read_text())["sites"]
    crashed = [s for s in after.values() if [r["round"] for r in s["rounds"]] == [1, 2]]
    assert len(crashed) == 2
    for site_id, site in after.items():
        assert site["epsilon"] >= at_kill[site_id]["epsilon"]  # no site's spend falls at a resume
    for site in crashed:
        redone = [e for e in site["events"] if e["event"] == "spent_before_resume"]
        assert [(e["round"], e["epsilon"], e.get("replayed")) for e in redone] == [(3, site["epsilon"], None)]
        assert redone[0]["steps"] > 0
    replayed = [s for s in after.values() if s not in crashed]  # partition 0 re-sent its round-3 reply: no new charge
    assert len(replayed) == 1 and [r["round"] for r in replayed[0]["rounds"]] == [1, 2, 3, 4]
    redone = [e for e in replayed[0]["events"] if e["event"] == "spent_before_resume"]
    assert [(e["round"], e.get("replayed")) for e in redone] == [(3, True)]  # its spend is the recorded round's again
    report = audit_run(run)
    assert [v for v in report["violations"] if "seeded with --seed" not in v["reason"]] == []
    rows = RunFolder(run).read_metrics()
    assert not any(e["event"] == "spent_before_resume" for r in rows for e in r.get("events", []))  # history, not round 3's


# --- a site that dies mid-round ----------------------------------------------------------
@pytest.fixture(scope="module")
def site_setup(tmp_path_factory):
    from fedpggan.build import build_gan
    from fedpggan.data import open_dataset

    cfg = tiny_config(tmp_path_factory.mktemp("site"), epsilon=10.0, rounds=3)
    data = open_dataset("phantom", "train").subset(np.arange(300))
    torch.manual_seed(0)
    return cfg, data, build_gan(cfg, data.image_size, data.channels, data.num_classes)


def site_round(site_setup, state, round_num: int, input_sha: str, crash: bool = False):
    """One round at a site on a fresh copy of the same global model; ``crash`` dies after the
    spend is reserved, inside DP-SGD."""
    import copy

    from client.site_round import round_key, run_site_round
    from fedpggan.privacy import DiscriminatorTrainer

    cfg, data, gan = site_setup
    gan = copy.deepcopy(gan)
    if crash:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DiscriminatorTrainer, "train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                run_site_round(gan, data, cfg, state, round_num, 0, round_key(input_sha, cfg, data))
        return None, None
    result = run_site_round(gan, data, cfg, state, round_num, 0, round_key(input_sha, cfg, data))
    return result, gan.d.state_dict()


def fresh_state(tmp_path: Path, name: str):
    from client.site import SiteState

    state = SiteState.load(tmp_path / name, "run")
    state.noise_key = "5e" * 32  # the same secret key: two sites that would draw identical noise
    return state


def test_a_round_interrupted_mid_training_is_recomputed_under_its_reservation(site_setup, tmp_path):
    whole = fresh_state(tmp_path, "whole")
    expected, expected_d = site_round(site_setup, whole, 1, "inputs")
    crashed = fresh_state(tmp_path, "crashed")
    site_round(site_setup, crashed, 1, "inputs", crash=True)
    assert crashed.history == whole.history  # spent before training
    result, d = site_round(site_setup, crashed, 1, "inputs")
    assert result.recovered and result.privacy["epsilon"] == expected.privacy["epsilon"]
    assert crashed.history == whole.history  # not charged twice ...
    assert all(torch.equal(d[k], expected_d[k]) for k in d)  # ... because it is the very output paid for


def test_an_interrupted_round_sent_again_with_other_inputs_is_charged_again(site_setup, tmp_path):
    state = fresh_state(tmp_path, "s")
    site_round(site_setup, state, 1, "inputs", crash=True)
    once = [list(h) for h in state.history]
    result, _ = site_round(site_setup, state, 1, "other inputs")
    assert not result.recovered
    assert state.history[-1][2] == once[-1][2] + site_setup[0].local_steps  # the lost round stays spent


def test_an_old_reservation_is_not_reused_once_the_site_moved_on(site_setup, tmp_path):
    state = fresh_state(tmp_path, "s")
    site_round(site_setup, state, 1, "inputs", crash=True)
    site_round(site_setup, state, 2, "round 2")
    before = state.history[-1][2]
    result, _ = site_round(site_setup, state, 1, "inputs")
    assert not result.recovered and state.history[-1][2] == before + site_setup[0].local_steps


def test_a_round_asked_again_with_other_options_or_data_gets_a_draw_of_its_own(site_setup, tmp_path, monkeypatch):
    """The same weights with other options (or other data) make another output: it must not share
    the first one's noise, or the two would reveal the difference of their clipped sums."""
    import client.site_round as site_round_module

    labels = []
    real_secret_noise = site_round_module.secret_noise
    monkeypatch.setattr(site_round_module, "secret_noise",
                        lambda state, cfg, *parts: labels.append(parts) or real_secret_noise(state, cfg, *parts))
    cfg, data, gan = site_setup
    cfg = dataclasses.replace(cfg, rounds=4)  # a budget planned for the four outputs below
    state = fresh_state(tmp_path, "s")
    site_round((cfg, data, gan), state, 1, "weights")
    site_round((dataclasses.replace(cfg, max_grad_norm=0.25), data, gan), state, 1, "weights")
    site_round((cfg, data.subset(np.arange(299)), gan), state, 1, "weights")
    site_round((dataclasses.replace(cfg, out=str(tmp_path / "moved")), data, gan), state, 1, "weights")
    rounds = [parts for parts in labels if parts[0] == "round"]
    assert len(rounds) == 4 and len(set(rounds[:3])) == 3  # three different outputs, three draws
    assert rounds[3] == rounds[0]  # where the run folder lies changes nothing the site computes
    assert state.history[-1][2] == 4 * cfg.local_steps  # and each output was charged


def test_a_lost_release_is_redrawn_only_from_the_inputs_it_was_charged_for(site_setup, tmp_path):
    from client.site_round import ensure_mechanism, ensure_release

    cfg, data, _ = site_setup
    state = fresh_state(tmp_path, "s")
    ensure_mechanism(state, cfg, len(data))
    first = ensure_release(state, cfg, data)
    state.release_file.unlink()  # lost, e.g. by a partial restore; site_state.json survives
    assert torch.equal(ensure_release(state, cfg, data), first)  # the same draw on the same inputs: nothing new
    state.release_file.unlink()
    with pytest.raises(FedPGGANError, match="cannot show that a new draw would be the release it was charged for"):
        ensure_release(state, cfg, data.subset(np.arange(299)))
    with pytest.raises(FedPGGANError, match="plain/secure mode changed"):  # the same draw at 1/sqrt(4) of the noise
        ensure_release(state, cfg, data, share_of=4)
    state.release_key = ""  # a state from before the key was recorded: its inputs cannot be vouched for
    with pytest.raises(FedPGGANError, match="its state predates that record"):
        ensure_release(state, cfg, data)


def test_a_run_cannot_change_its_budget_once_the_site_fixed_its_mechanism(site_setup, tmp_path):
    from client.site_round import ensure_mechanism

    cfg, data, _ = site_setup
    state = fresh_state(tmp_path, "s")
    ensure_mechanism(state, cfg, len(data))
    ensure_mechanism(state, cfg, len(data))  # the same options: nothing to do
    # a site whose caps were lowered mid-run checks them against the epsilon it still spends under
    for changed in (dict(epsilon=cfg.epsilon / 2), dict(delta=1e-6), dict(accountant="rdp"), dict(epsilon=math.inf)):
        with pytest.raises(FedPGGANError, match="fixed its mechanism for epsilon"):
            ensure_mechanism(state, dataclasses.replace(cfg, **changed), len(data))
    # nor can a run that trained without DP turn DP on: a finite epsilon would not cover its earlier rounds
    plain = fresh_state(tmp_path, "p")
    plain.trained_without_dp = True
    ensure_mechanism(plain, dataclasses.replace(cfg, epsilon=math.inf), len(data))
    with pytest.raises(FedPGGANError, match="already trained this run without DP"):
        ensure_mechanism(plain, cfg, len(data))
    assert plain.noise_multiplier is None


def test_a_missing_site_state_beside_proof_of_spend_is_refused(site_setup, tmp_path):
    from client.site import SiteState

    state = fresh_state(tmp_path, "s")
    site_round(site_setup, state, 1, "weights")
    backup = state.path.read_text()
    site_round(site_setup, state, 2, "weights 2")
    torch.save({"round": 2, "input_sha": state.rounds["2"]["input_sha"]}, state.reply_cache)  # as client_app.remember does
    assert SiteState.load(tmp_path / "s", "run").history == state.history  # the latest state agrees with its files
    state.path.write_text(backup)  # an earlier backup restored: round 2's spend would be forgotten
    with pytest.raises(FedPGGANError, match="older than the files beside it .*last_reply.pt holds round 2"):
        SiteState.load(tmp_path / "s", "run")
    state.path.write_text(json.dumps({"run_id": "run"}))  # a reset state
    with pytest.raises(FedPGGANError, match="embedding_release.pt exists but no spend is recorded"):
        SiteState.load(tmp_path / "s", "run")
    state.path.write_text("{}")
    with pytest.raises(FedPGGANError, match="site privacy state is corrupt"):
        SiteState.load(tmp_path / "s", "run")
    state.path.unlink()  # deleted, or a backup restored without it
    with pytest.raises(FedPGGANError, match="embedding_release.pt, last_reply.pt beside it show this site already spent"):
        SiteState.load(tmp_path / "s", "run")


def test_the_lifetime_cap_reads_fields_the_site_state_writes():
    """A SiteState field renamed without the reader would read as nothing spent."""
    import inspect

    from client.site import SiteState
    from fedpggan.privacy import lifetime

    read = set(re.findall(r'data\.get\("(\w+)"\)', inspect.getsource(lifetime._counted_budget)))
    assert read == set(lifetime.STATE_FIELDS_READ) and read <= set(SiteState.__dataclass_fields__)


@pytest.mark.parametrize("damage, says", [
    (lambda state: state.path.write_bytes(b"\xff\xfe"), "site privacy state is corrupt"),
    (lambda state: edit_state(state, history=[[1.0, 0.1]]), "'history' is not a list of"),
    (lambda state: edit_state(state, rounds=None), "'rounds' is not an object"),
    (lambda state: edit_state(state, noise_key="zz"), "'noise_key' is not 64 hex digits"),
    (lambda state: state.reply_cache.write_bytes(state.reply_cache.read_bytes()[:100]), "last_reply.pt: unreadable"),
    (lambda state: torch.save(torch.zeros(2), state.reply_cache), "last_reply.pt: not a reply this site cached"),
    (lambda state: edit_state(state, spent_elsewhere=1), "does not know (spent_elsewhere): written by a newer version?"),
])
def test_a_damaged_site_state_is_named_with_its_fix_not_a_traceback(site_setup, tmp_path, damage, says):
    """What a site reads its spend from is checked field by field: a damaged copy would misstate it."""
    from client.site import SiteState

    state = fresh_state(tmp_path, "s")
    site_round(site_setup, state, 1, "weights")
    torch.save({"round": 1, "input_sha": state.rounds["1"]["input_sha"]}, state.reply_cache)  # as client_app.remember does
    damage(state)
    with pytest.raises(FedPGGANError, match=re.escape(says)) as refused:
        SiteState.load(tmp_path / "s", "run")
    assert str(state.path.parent) in str(refused.value) and "\n" not in str(refused.value)
    if "last_reply" in says:  # only a spare copy: it may be moved aside, once the state is known to be the latest
        assert "if site_state.json is certainly the latest copy, move it aside" in str(refused.value)


def edit_state(state, **changes) -> None:
    state.path.write_text(json.dumps({**json.loads(state.path.read_text()), **changes}))


def test_a_round_answered_then_asked_again_with_other_inputs_and_interrupted_leaves_a_state_that_loads(site_setup, tmp_path):
    """(after a coordinator resumed from an older checkpoint, say): the stale cached reply goes
    before the new reservation, so the state is not taken for an older copy of itself."""
    from client.site import SiteState

    state = fresh_state(tmp_path, "s")
    site_round(site_setup, state, 1, "weights")
    torch.save({"round": 1, "input_sha": state.rounds["1"]["input_sha"]}, state.reply_cache)  # as client_app.remember does
    site_round(site_setup, state, 1, "other weights", crash=True)
    assert not state.reply_cache.exists()
    assert SiteState.load(tmp_path / "s", "run").rounds["1"]["status"] == "reserved"


def test_an_exhausted_site_sends_nothing_computed_from_its_data(site_setup, tmp_path):
    cfg, _, _ = site_setup
    state = fresh_state(tmp_path, "s")
    for r in range(1, cfg.rounds + 1):
        site_round(site_setup, state, r, f"round {r}")
    refused, sent_d = site_round(site_setup, state, cfg.rounds + 1, "one more")
    assert refused.status == "exhausted" and refused.embedding_release is None
    # the reply carries D as the server sent it (client_app sends gan.d whatever the status): untouched by the data
    received_d = site_setup[2].d.state_dict()
    assert sent_d.keys() == received_d.keys()
    assert all(torch.equal(sent_d[k], received_d[k]) for k in sent_d)


def test_what_a_site_tells_the_coordinator_of_a_failure_names_neither_its_paths_nor_its_other_studies(tmp_path):
    from types import SimpleNamespace

    from client.client_app import site_handler

    node = {"site-id": "a", "data-path": str(tmp_path / "site.npz"), "state-dir": str(tmp_path / "state"),
            "spend-journal": "j", "peer-keys": ""}  # a relative or empty value is no path to hide: the text stays whole

    def coordinator_reads(exc: Exception) -> FedPGGANError:
        @site_handler
        def handler(msg, context):
            raise exc

        with pytest.raises(FedPGGANError) as caught:
            handler(None, SimpleNamespace(node_config=node))
        assert caught.value.__cause__ is exc  # the site's own log keeps the whole error
        return caught.value

    assert str(coordinator_reads(FedPGGANError(f"{tmp_path / 'state'}/run/site_state.json: unreadable"))) == \
        "<state-dir>/run/site_state.json: unreadable"
    assert str(coordinator_reads(FileNotFoundError(f"no such file: '{tmp_path / 'site.npz'}'"))) == \
        "FileNotFoundError: no such file: '<data-path>'"
    assert str(coordinator_reads(FedPGGANError("earlier runs took 9 (study-x (9))", shared="over the cap"))) == "over the cap"
    assert str(coordinator_reads(FedPGGANError("journal j: site_state.json"))) == "journal j: site_state.json"
    assert str(coordinator_reads(FedPGGANError("j/2026.log: unreadable"))) == "<spend-journal>/2026.log: unreadable"
    # an image's file name can be a patient number: nothing below the data path is named
    broken = tmp_path / "site.npz" / "pneumonia" / "MRN123456_broken.png"
    assert str(coordinator_reads(FedPGGANError(f"{broken}: not a readable image (cannot identify image file '{broken}')"))) == \
        "<data-path>"  # no character can mark where a file name ends: the rest of the line goes
    assert str(coordinator_reads(FedPGGANError(f"{tmp_path / 'site.npz'}: not an npz archive"))) == \
        "<data-path>: not an npz archive"  # the data path itself, with nothing below it, keeps its reason
    node["data-path"] = "imgs"  # relative, as a hand-typed node config may have it
    assert str(coordinator_reads(FedPGGANError("imgs/normal/MRN1.png: broken; the imgs folder"))) == "<data-path>"
    node["data-path"] = "./imgs"  # named "imgs/..." by the loaders (Path drops "./"), or absolute
    assert str(coordinator_reads(PermissionError(13, "Permission denied", "imgs/normal/MRN1 Smith.png"))) == \
        "PermissionError: [Errno 13] Permission denied: '<data-path>"
    assert str(coordinator_reads(FedPGGANError(f"{os.path.abspath('imgs')}/MRN1: no images"))) == "<data-path>"
    # the data errors that name an image give the coordinator a text that names none, whatever the name holds
    from fedpggan.data.folder import _read_one

    node["data-path"] = str(tmp_path / "imgs")
    for name in ("O'Brien_MRN4711.png", "Smith: MRN4711.png", 'say "MRN4711".png', "John Smith 1234.png"):
        (tmp_path / "imgs" / "normal").mkdir(parents=True, exist_ok=True)
        odd = tmp_path / "imgs" / "normal" / name
        odd.write_bytes(b"not an image")
        with pytest.raises(FedPGGANError) as unreadable:
            _read_one(odd)
        assert str(coordinator_reads(unreadable.value)) == \
            "<data-path>: an image is not readable (UnidentifiedImageError); the site's log names it"
        Image.new("L", (30, 28)).save(odd, format="PNG")
        with pytest.raises(FedPGGANError) as not_square:
            _read_one(odd)
        assert str(coordinator_reads(not_square.value)) == "<data-path>: an image is 30x28, not square; the site's log names it"


def test_a_mistyped_node_config_key_is_refused_not_ignored():
    from client.site import check_node_config_keys
    from fedpggan.site_config import NODE_CONFIG_KEYS

    check_node_config_keys({"partition-id": 0, "num-partitions": 5})  # a simulated site: Flower's keys
    check_node_config_keys({k: "x" for k in NODE_CONFIG_KEYS})
    with pytest.raises(FedPGGANError, match="max-total-epsilom unknown: a mistyped key sets nothing"):
        check_node_config_keys({"site-id": "a", "data-path": "/d", "max-epsilon": 10.0, "max-total-epsilom": 5.0})


def test_a_site_caps_what_all_runs_on_its_records_spend_together(site_setup, tmp_path):
    from client.site import SiteState, check_lifetime_budget, state_dir

    cfg, _, _ = site_setup  # epsilon 10
    first = SiteState.load(tmp_path / "state", "run-a")
    first.budget_epsilon, first.history = 10.0, [[1.0, 0.1, 8]]
    first.save()
    second = SiteState.load(tmp_path / "state", "run-b")
    second.delta = 1e-5  # as ensure_mechanism sets it before the check
    with pytest.raises(FedPGGANError, match=r"earlier runs took 10 \(run-a \(10\)\): together above its max-total-epsilon 15"):
        check_lifetime_budget({"max-total-epsilon": 15.0}, second, cfg)
    check_lifetime_budget({}, second, cfg)  # no lifetime cap set
    check_lifetime_budget({"max-total-epsilon": 20.0}, second, cfg)
    assert SiteState.load(tmp_path / "state", "run-b").lifetime_reserved == 10.0  # reserved at once, under one lock
    third = SiteState.load(tmp_path / "state", "run-c")  # so a run started at the same time sees both
    third.delta = 1e-5
    with pytest.raises(FedPGGANError, match=r"earlier runs took 20 \(run-a \(10\), run-b \(10\)\)") as refused:
        check_lifetime_budget({"max-total-epsilon": 25.0}, third, cfg)
    assert "run-a" not in refused.value.shared and "max-total-epsilon" in refused.value.shared  # what the coordinator reads
    check_lifetime_budget({"max-total-epsilon": 20.0}, second, cfg)  # run-b itself, asked again: already counted
    with pytest.raises(FedPGGANError, match="above its max-total-epsilon 20"):  # but not for more than it reserved
        check_lifetime_budget({"max-total-epsilon": 20.0}, second, dataclasses.replace(cfg, epsilon=12.0))
    with pytest.raises(FedPGGANError, match="no 'state-dir'"):  # a real site never lets the coordinator choose
        state_dir({"data-path": "/data/site.npz", "site-id": "a"}, {"site-state-root": str(tmp_path)})
    for outside in ("../elsewhere", "a/b", ".."):  # nor a run id that leads out of the state dir, past the cap
        with pytest.raises(FedPGGANError, match="not a plain folder name"):
            SiteState.load(tmp_path / "state", outside)


def test_a_site_caps_the_deltas_of_all_runs_on_its_records_too(site_setup, tmp_path):
    from client.site import SiteState, check_lifetime_budget, check_site_budget

    cfg, _, _ = site_setup  # epsilon 10

    def run_state(name, delta=1e-5, **fields):
        state = SiteState.load(tmp_path / "state", name)
        state.delta = delta  # as ensure_mechanism sets it before the check
        for key, value in fields.items():
            setattr(state, key, value)
        state.save()
        return state

    old = run_state("run-old", budget_epsilon=10.0, lifetime_reserved=10.0)  # reserved before deltas were
    new = run_state("run-new")
    with pytest.raises(FedPGGANError, match=r"asks for delta 1e-05 and this site's earlier runs took 1e-05 \(run-old "
                                            r"\(1e-05\)\): together above its max-total-delta 1.5e-05; run with a smaller "
                                            r"--run-config delta, or raise max-total-delta"):
        check_lifetime_budget({"max-total-epsilon": 100.0, "max-total-delta": 1.5e-5}, new, cfg)
    assert SiteState.load(tmp_path / "state", "run-new").lifetime_reserved is None  # a refused run reserves nothing
    check_lifetime_budget({"max-total-delta": 3e-5}, new, cfg)
    reloaded = SiteState.load(tmp_path / "state", "run-new")
    assert (reloaded.lifetime_reserved, reloaded.lifetime_reserved_delta) == (10.0, 1e-5)
    check_lifetime_budget({"max-total-delta": 3e-5}, old, cfg)  # the older run, asked again: it reserves its delta too
    assert SiteState.load(tmp_path / "state", "run-old").lifetime_reserved_delta == 1e-5
    third = run_state("run-third")
    check_lifetime_budget({"max-total-delta": 3e-5}, third, cfg)  # 1e-5 three times: 3.0000000000000004e-05 fits
    with pytest.raises(FedPGGANError, match="above its max-total-delta 3e-05"):
        check_lifetime_budget({"max-total-delta": 3e-5}, run_state("run-fourth", delta=1e-7), cfg)
    with pytest.raises(FedPGGANError, match=r"asks for no DP \(delta 1\)"):
        check_lifetime_budget({"max-total-delta": 0.5}, run_state("run-plain", delta=None), dataclasses.replace(cfg, epsilon=math.inf))
    with pytest.raises(RuntimeError, match="call ensure_mechanism first"):  # the mechanism fixes delta before the check
        check_lifetime_budget({"max-total-delta": 0.5}, run_state("run-early", delta=None), cfg)
    from client.site_round import run_site_round

    plain_cfg, data, gan = dataclasses.replace(cfg, epsilon=math.inf), *site_setup[1:]
    run_site_round(copy.deepcopy(gan), data, plain_cfg, run_state("run-without-dp", delta=None), 1, 0)
    assert SiteState.load(tmp_path / "state", "run-without-dp").trained_without_dp  # trained when the site had no cap
    with pytest.raises(FedPGGANError, match=r"run-without-dp \(inf\)"):
        check_lifetime_budget({"max-total-epsilon": 1000.0}, run_state("run-later"), cfg)
    with pytest.raises(FedPGGANError, match=r"max-total-delta 0.01 is not below 1/n = 0.01"):
        check_site_budget({"max-epsilon": 10.0, "max-total-delta": 0.01}, cfg, 100)
    with pytest.raises(FedPGGANError, match=r"max-total-delta 1e-06 is below its max-delta 1e-05: one run could pass"):
        check_site_budget({"max-epsilon": 10.0, "max-total-delta": 1e-6, "max-delta": 1e-5}, cfg, 100)


def test_a_spend_record_no_cap_can_count_is_refused_not_read_as_nothing_spent(tmp_path):
    from fedpggan.privacy.lifetime import read_spend_journal, reserved_budgets

    run = tmp_path / "state" / "run-a"
    run.mkdir(parents=True)
    for text in ('{"lifetime_reserved": NaN}', '{"budget_epsilon": -1, "history": [[1, 1, 1]]}', "[1, 2]",
                 '{"lifetime_reserved": "ten"}'):
        (run / "site_state.json").write_text(text)
        with pytest.raises(FedPGGANError, match="site_state.json: unreadable .*restore the file from backup"):
            reserved_budgets(tmp_path / "state")
    journal = tmp_path / "journal.jsonl"
    journal.write_text('{"run": "run-a", "epsilon": NaN, "delta": 1e-05}\n')
    with pytest.raises(FedPGGANError, match="line 1: unreadable"):
        read_spend_journal(journal)
    journal.write_bytes(b"\xff\xfe binary")
    from fedpggan.privacy.lifetime import journal_records_spend

    for read in (read_spend_journal, lambda path: journal_records_spend(path, "run-a")):  # the lost-state check reads it first
        with pytest.raises(FedPGGANError, match="journal.jsonl: cannot read .not a text file.*'spend-journal' path"):
            read(journal)


def test_a_spend_journal_keeps_runs_a_restored_state_dir_forgot(site_setup, tmp_path):
    from client.site import SiteState, check_lifetime_budget

    cfg, _, _ = site_setup  # epsilon 10
    journal = tmp_path / "other-volume.jsonl"
    node = {"max-total-epsilon": 25.0, "spend-journal": str(journal)}

    def run_state(name):
        state = SiteState.load(tmp_path / "state", name)
        state.delta = 1e-5  # as ensure_mechanism sets it before the check
        return state

    def journal_lines():
        return [(e["run"], e["epsilon"], e["delta"]) for e in map(json.loads, journal.read_text().splitlines())]

    (tmp_path / "state" / "run-early").mkdir(parents=True)  # reserved before the site kept a journal
    (tmp_path / "state" / "run-early" / "site_state.json").write_text(json.dumps({"lifetime_reserved": 1.0, "delta": 1e-6}))
    check_lifetime_budget(node, run_state("run-a"), cfg)
    check_lifetime_budget(node, run_state("run-b"), cfg)
    assert journal_lines() == [("run-early", 1.0, 1e-6), ("run-a", 10.0, 1e-5), ("run-b", 10.0, 1e-5)]  # copied in once
    for lost in ("run-early", "run-a"):  # the state dir restored from a backup made before them
        shutil.rmtree(tmp_path / "state" / lost)
    with pytest.raises(FedPGGANError, match=r"earlier runs took 21 \(run-b \(10\), run-early \(1, in spend-journal only\), "
                                            r"run-a \(10, in spend-journal only\)\)"):
        check_lifetime_budget(node, run_state("run-c"), cfg)
    rolled_back = run_state("run-b")  # a run whose own reservation was lost reserves again: the others still count
    rolled_back.lifetime_reserved = None
    check_lifetime_budget(node, rolled_back, cfg)
    assert len(journal_lines()) == 4
    check_lifetime_budget(node, rolled_back, cfg)  # reserved in both places now: nothing more is written
    assert len(journal_lines()) == 4
    check_lifetime_budget({"max-total-epsilon": 25.0}, run_state("run-c"), cfg)  # without the journal they are forgotten
    journal.write_text(journal.read_text() + '{"run": "run-d", "epsilon": 10.0}\n')  # a damaged line
    with pytest.raises(FedPGGANError, match=r"spend-journal .*, line 5: unreadable"):
        check_lifetime_budget(node, run_state("run-e"), cfg)


def test_corrupt_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, capsys):
    run = simulate(tiny_config(tmp_path / "run", rounds=3, keep_checkpoints=3))
    folder = RunFolder(run)
    newest = folder.checkpoints / folder.checkpoint_index()[-1]["file"]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    capsys.readouterr()
    path, entry = folder.latest_checkpoint()
    assert entry["round"] == 2 and path != newest
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {newest} (round 3): missing or hash mismatch") and err.count("\n") == 1
    # an export never falls back unasked: it names the newest checkpoint and how to pick another
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--allow-unaudited", "--allow-no-dp"]) == 2
    err = capsys.readouterr().err
    assert "the newest checkpoint (round 3) is missing or fails its hash check" in err and "--checkpoint ROUND" in err
    assert "(rounds that verify: 1, 2)" in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    for entry in folder.checkpoint_index():  # none left that verifies: one line that says how to recover
        (folder.checkpoints / entry["file"]).unlink(missing_ok=True)
    assert main(["evaluate", str(run), "--quick", "--out", str(tmp_path / "quick")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run}: all 3 checkpoints are missing") and "from a backup" in err and err.count("\n") == 1
    assert not (tmp_path / "quick").exists()  # a refused evaluation makes no folder
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--allow-unaudited", "--allow-no-dp"]) == 2
    err = capsys.readouterr().err  # export says the same, not to pick an older one that is not there
    assert "no older one verifies either: restore" in err and "--checkpoint ROUND" not in err and err.count("\n") == 1


# --- failing and hostile sites ------------------------------------------------------------
def simulate_with_hostile_site(tmp_path: Path, monkeypatch, modes: str, drop: float = 0.0, **overrides) -> Path:
    """A 4-site simulation whose partition 0 tampers with its replies and whose other sites
    crash with probability ``drop`` per round (simulation/faults.py)."""
    from flwr.simulation import run_simulation

    from server.server_app import make_server_app
    from simulation.faults import app as faulty_sites

    monkeypatch.setenv("FEDPGGAN_FAULT_MODES", modes)  # Ray's workers inherit them
    monkeypatch.setenv("FEDPGGAN_FAULT_DROP", str(drop))
    cfg, _ = prepare(tiny_config(tmp_path / "run", clients=4, rounds=len(modes.split(",")), **overrides))
    run_simulation(server_app=make_server_app(cfg), client_app=faulty_sites, num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}})
    return Path(cfg.out)


def test_broken_and_hostile_updates_are_rejected_and_logged(tmp_path, monkeypatch):
    run = simulate_with_hostile_site(tmp_path, monkeypatch, "nan,scaled,random,shapes", drop=0.25,
                                     aggregation="median", min_clients=1)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    rows = RunFolder(run).read_metrics()
    crashed = [[e["site"] for e in r.get("events", []) if e["event"] == "failed"] for r in rows]
    expected = [[str(p) for p in (1, 2, 3) if random.Random(f"{n}/{p}").random() < 0.25] for n in (1, 2, 3, 4)]
    assert crashed == expected and any(expected), "injected crashes must be logged, and only those"
    assert [r["accepted"] for r in rows] == [3 - len(c) for c in crashed]  # crashed sites rejoin next round
    reasons = [[e["reason"] for e in r["events"] if e["event"] == "rejected_update"] for r in rows]
    assert all(len(r) == 1 for r in reasons), reasons
    assert "non-finite" in reasons[0][0] and "median update" in reasons[1][0] and "model norm" in reasons[2][0]
    assert "array names differ" in reasons[3][0]
    assert all(torch.isfinite(v).all() for v in final_weights(run).values() if v.is_floating_point())


def test_a_hostile_sites_locally_trained_generators_are_rejected_too(tmp_path, monkeypatch):
    run = simulate_with_hostile_site(tmp_path, monkeypatch, "scaled-g", generator_training="local")
    events = RunFolder(run).read_metrics()[0]["events"]
    assert [(e["site"], e["event"]) for e in events] == [("0", "rejected_update")]
    assert events[0]["reason"].startswith("generators: update norm") and "median update norm" in events[0]["reason"]


def test_a_run_ended_early_keeps_its_last_round_in_a_checkpoint(monkeypatch):
    """With --checkpoint-every 3, a run whose sites are all exhausted at round 5 still checkpoints
    round 5 (once): the generators it trained since round 3 are what export should publish."""
    from types import SimpleNamespace

    import server.federated_run
    from server.federated_run import FederatedRun

    saved = []
    monkeypatch.setattr(server.federated_run, "save_checkpoint", lambda path, gan, **kw: saved.append(kw["round"]) or "f" * 64)
    run = FederatedRun.__new__(FederatedRun)
    run.cfg = RunConfig(rounds=10, checkpoint_every=3)
    run.folder = SimpleNamespace(checkpoint_path=lambda r: Path(f"ckpt_{r}.pt"), save_ledger=lambda *a: None,
                                 record_checkpoint=lambda *a: None)
    run.ledger = SimpleNamespace(record_checkpoint=lambda *a: None, data={"checkpoints": [{}]})
    run.gan, run.g_trainer, run.failed_rounds, run.releases, run.run_info = None, SimpleNamespace(state_dict=dict), 0, {}, {}
    for round_num in range(1, 6):
        run.checkpoint(round_num)
    run.checkpoint(5, last=True)
    assert saved == [3, 5]
    run.checkpoint(6)
    run.checkpoint(6, last=True)  # written by the round itself: not twice
    assert saved == [3, 5, 6]


def test_site_reporting_an_inconsistent_spend_is_excluded(tmp_path, monkeypatch):
    run = simulate_with_hostile_site(tmp_path, monkeypatch, "overspend,none", epsilon=10.0)
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    hostile = [s for s in ledger["sites"].values() if s["status"] == "excluded"]
    assert len(hostile) == 1 and "noise_multiplier" in hostile[0]["events"][0]["reason"]
    assert hostile[0]["events"][0]["reported_epsilon"] > 0 and hostile[0]["events"][0]["reported_total_steps"] > 0
    # what it says it spent counts in its epsilon and in the run's guarantee, its update discarded or not
    assert hostile[0]["epsilon"] == hostile[0]["events"][0]["reported_epsilon"]
    assert ledger["guarantee"]["epsilon"] >= hostile[0]["epsilon"]
    rows = RunFolder(run).read_metrics()
    assert rows[0]["accepted"] == 3 and rows[1]["selected"] == 3  # never selected again


def test_a_site_failing_the_secure_release_is_left_out_and_the_others_sum_again(tmp_path, monkeypatch):
    from fedpggan.audit import audit_run

    # site 3 fails the key step (left out of the key list); site 1 makes its share, then its vector is lost (a restart)
    monkeypatch.setenv("FEDPGGAN_FAULT_RELEASE", "keys:3,masked:1")
    run = simulate_with_hostile_site(tmp_path, monkeypatch, "none", epsilon=1.0, release_aggregation="secure")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["secure_release"]["sites"] == ["0", "2"] and info["secure_release"]["share_made_for"] == {"0": 3, "2": 3}
    assert "injected failure of site 1 in the secure release's masked step" in info["secure_release"]["left_out"]["1"]
    assert "injected failure of site 3 in the secure release's keys step" in info["secure_release"]["left_out"]["3"]
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    sigma = ledger["sites"]["0"]["feature_release"]["noise_multiplier"]
    for site in ("0", "2"):
        release = ledger["sites"][site]["feature_release"]
        # in a sum over 2 sites, but its least noisy share was made for the first key list's 3
        assert release["sites"] == 2 and release["share_made_for"] == 3
        assert release["share_noise_multiplier"] == pytest.approx(sigma / math.sqrt(3))
    for site in ("1", "3"):
        left_out = ledger["sites"][site]
        assert "injected failure" in left_out["feature_release"]["left_out"]
        assert left_out["events"][0]["event"] == "left_out_of_secure_release" and left_out["events"][0]["round"] == 0
        state = json.loads((run / "sites" / f"site_{site}" / "run" / "site_state.json").read_text())
        assert left_out["rounds"] and state["history"][0] == [sigma, 1.0, 1]  # it still trains D; the release is charged
    # The sum is the survivors' shares made for 3 sites, each topped up to carry sigma^2 / 2: sigma in all.
    shares = {s: torch.load(run / "sites" / f"site_{s}" / "run" / "embedding_release.pt", weights_only=True).double()
              for s in ("0", "2")}
    pooled = torch.load(run / "secure_release_sum.pt", weights_only=True)
    top_ups = pooled - sum(shares.values())
    assert float(top_ups.std()) == pytest.approx(sigma * math.sqrt(2 * (1 / 2 - 1 / 3)), rel=0.1)
    revealed = {s: (run / "sites" / f"site_{s}" / "run" / "secure_release.revealed").exists() for s in "0123"}
    assert revealed == {"0": True, "1": False, "2": True, "3": False}  # one self-mask each, of the second attempt
    audit = audit_run(run)
    assert audit["passed"], audit["findings"]
    for site in ("1", "3"):
        assert any(n.startswith(f"sites.{site}: left out of the secure sum") and "injected failure" in n for n in audit["notes"])
    assert any(n.startswith("sites.0: the embedding release was summed securely over 2 sites") for n in audit["notes"])


def test_a_secure_release_that_fails_leaves_the_runs_spend_on_record(tmp_path, monkeypatch):
    """Every site made its share (and charged its release) before site 2 withheld its seed: the run
    stops, and neither run.json ("running") nor the ledger (epsilon 0) may say otherwise."""
    from fedpggan.audit import audit_run
    from fedpggan.privacy.accounting import epsilon_of
    from fedpggan.privacy.feature_release import release_history

    monkeypatch.setenv("FEDPGGAN_FAULT_RELEASE", "reveal:2")
    with pytest.raises(FedPGGANError, match="site 2 did not reveal its self-mask"):
        simulate_with_hostile_site(tmp_path, monkeypatch, "none", epsilon=1.0, release_aggregation="secure")
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "site 2 did not reveal its self-mask" in info["reason"]
    assert not (run / "secure_release_sum.pt").exists() and not RunFolder(run).read_metrics()  # no round began
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    for site_id, site in ledger["sites"].items():
        state = json.loads((run / "sites" / f"site_{site_id}" / "run" / "site_state.json").read_text())
        assert state["history"] == [[site["feature_release"]["noise_multiplier"], 1.0, 1]]  # what the site charged itself
        spent = epsilon_of(release_history(site["feature_release"]["noise_multiplier"]), site["delta"], site["accountant"])
        assert site["epsilon"] == pytest.approx(spent) and spent > 0.1
    assert ledger["guarantee"]["epsilon"] == pytest.approx(max(s["epsilon"] for s in ledger["sites"].values()))
    assert info["final_epsilon"] == ledger["guarantee"]["epsilon"]
    for site in ledger["sites"].values():  # no sum was made: each is left out of it, its share's worst case stated
        release = site["feature_release"]
        assert release["left_out"].startswith("the secure sum failed: secure release: site 2 did not")
        assert release["share_made_for"] == 4 and site["events"][-1]["event"] == "left_out_of_secure_release"
    audit = audit_run(run)
    assert audit["passed"], audit["violations"]
    assert sum(n.startswith("sites.") and "left out of the secure sum of the embedding releases (the secure sum failed: "
               "secure release: site 2 did not" in n and "if a share it sent is unmasked" in n for n in audit["notes"]) == 4


def model_norm(state: dict[str, torch.Tensor]) -> float:
    """L2 norm of a state dict's floating-point arrays: the validator's norm, from zero."""
    return update_norm(state, {k: torch.zeros_like(v) for k, v in state.items()})


def honest_and_hostile_updates(attack: str, n_honest: int = 5) -> tuple[list[dict], dict, dict]:
    """D-shaped updates: honest ones a few small steps from the global model, one hostile one
    that passes validation (it moves D by just under the allowed bound)."""
    from fedpggan.build import build_gan

    torch.manual_seed(0)
    global_d = build_gan(tiny_config(Path("unused")), 28, 1, 2).d.state_dict()
    norm = model_norm(global_d)
    step = {k: 0.002 * torch.randn_like(v) for k, v in global_d.items()}  # the honest direction
    honest = [{k: v + step[k] + 0.0005 * torch.randn_like(v) for k, v in global_d.items()} for _ in range(n_honest)]
    if attack == "random":
        direction = {k: torch.randn_like(v) for k, v in global_d.items()}
    else:  # "reversed": push against the honest direction, scaled up
        direction = {k: -s for k, s in step.items()}
    length = model_norm(direction)
    scale = 0.95 * MAX_RELATIVE_UPDATE * norm / length
    hostile = {k: v + scale * direction[k] for k, v in global_d.items()}
    assert update_problem(hostile, global_d) is None  # the validator cannot catch it ...
    honest_mean = aggregate(honest, "fedavg")
    return [*honest, hostile], honest_mean, global_d


@pytest.mark.parametrize("attack", ["random", "reversed"])
def test_robust_aggregation_withstands_a_hostile_site(attack):
    updates, honest_mean, global_d = honest_and_hostile_updates(attack)
    honest_move = update_norm(honest_mean, global_d)
    # ... FedAvg is dragged far from the honest consensus, the robust rules are not
    assert update_norm(aggregate(updates, "fedavg"), honest_mean) > 5 * honest_move
    for rule in ("median", "trimmed-mean"):
        assert update_norm(aggregate(updates, rule), honest_mean) < 0.5 * honest_move, rule


def test_weighted_aggregation_is_the_count_weighted_mean_and_needs_a_count_per_site():
    from fedpggan.privacy.mechanism import Mechanism, averaged_d_noise

    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(3)}]
    merged = aggregate(states, "weighted", [100, 300])
    assert torch.allclose(merged["w"], torch.tensor([3.25, 6.5])) and merged["n"] == 3
    assert torch.equal(aggregate(states, "weighted", [7, 7])["w"], aggregate(states, "fedavg")["w"])
    for counts in (None, [100], [100, 0]):
        with pytest.raises(ValueError, match="one positive record count per state"):
            aggregate(states, "weighted", counts)
    from server.aggregation import AGGREGATIONS, aggregation_assumption

    said = {rule: aggregation_assumption(rule) for rule in AGGREGATIONS}  # what each run's ledger states
    assert "public record count" in said["weighted"] and all(f"({rule})" in said[rule] for rule in ("fedavg", "median", "trimmed-mean"))
    # the generator-step rule's noise: the same as equal weights for equal counts, lower when a noisy site is small
    noisy, quiet = Mechanism(8.0, 1.0, 1e-5, None), Mechanism(1.0, 0.05, 1e-5, None)
    equal = [(noisy, 1000), (quiet, 1000)]
    assert averaged_d_noise(equal, 2, weighted=True) == pytest.approx(averaged_d_noise(equal, 2))
    assert averaged_d_noise(equal, 1, weighted=True) == pytest.approx(averaged_d_noise(equal, 1))
    skewed = [(noisy, 50), (quiet, 2000)]
    assert averaged_d_noise(skewed, 2, weighted=True) < averaged_d_noise(skewed, 2) / 5
    # a fraction of the sites per round: one site averaged carries its own noise whatever its count
    assert averaged_d_noise(skewed, 1, weighted=True) == pytest.approx(averaged_d_noise(skewed, 1))
    many = [(noisy if i % 4 == 0 else quiet, 40 + 97 * i) for i in range(16)]  # C(16, 8) = 12870 sets: sampled
    every_set = [sum((many[i][1] / sum(many[j][1] for j in chosen) * many[i][0].noise_multiplier
                      / (many[i][1] * many[i][0].sample_rate)) ** 2 for i in chosen)
                 for chosen in itertools.combinations(range(16), 8)]
    assert averaged_d_noise(many, 8, weighted=True) == pytest.approx(math.sqrt(sum(every_set) / len(every_set)), rel=0.03)


def test_a_reply_missing_a_record_or_with_a_non_finite_spend_is_unreadable_not_a_crash():
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    spend = {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 8}

    def reply(status="trained", without=None, **privacy):
        records = {"d": ArrayRecord({"w": torch.zeros(2)}), "status": ConfigRecord({"status": status}),
                   "privacy": MetricRecord({**spend, **privacy})}
        return RecordDict({k: v for k, v in records.items() if k != without})

    assert reply_problem(reply(), dp=True) is None and reply_problem(reply("exhausted"), dp=True) is None
    for record in ("d", "status", "privacy"):
        assert reply_problem(reply(without=record), dp=True) == f"the reply lacks its '{record}' record"
    assert "'epsilon' = nan" in reply_problem(reply(epsilon=math.nan), dp=True)
    assert "'delta' = -1" in reply_problem(reply(delta=-1.0), dp=True)
    assert "neither" in reply_problem(reply("done"), dp=True)
    no_dp = RecordDict({"d": ArrayRecord({"w": torch.zeros(2)}), "status": ConfigRecord({"status": "trained"}),
                        "privacy": MetricRecord({"steps": 8})})
    assert reply_problem(no_dp, dp=False) is None and "'epsilon'" in reply_problem(no_dp, dp=True)
    # a hostile or broken site: records of the wrong kind, an unreadable step total (read to find unrecorded spend)
    wrong_kind = RecordDict({**{k: v for k, v in reply().items()}, "d": ConfigRecord({"w": 1})})
    assert reply_problem(wrong_kind, dp=True) == "its 'd' record is a ConfigRecord (expected ArrayRecord)"
    assert "'total_steps' = nan" in reply_problem(reply(total_steps=math.nan), dp=True)


def test_an_error_the_superlink_makes_for_a_lost_site_is_that_sites_failed_round_not_a_crash(tmp_path):
    """A SuperNode gone offline, or a message past its time to live: the SuperLink answers with its own node id
    (1) as the source; the reply is matched to the site by the message it replies to."""
    from types import SimpleNamespace

    from fedpggan.privacy.ledger import PrivacyLedger
    from pggan_model import PGGAN, ModelShape
    from server.federated_run import FederatedRun

    run = FederatedRun.__new__(FederatedRun)
    run.cfg = tiny_config(tmp_path, clients=2)
    run.sites = {7: {"site-id": "a"}, 8: {"site-id": "b"}}
    run.gan = PGGAN(ModelShape(28, 1, 2, latent_dim=8, g_width=8, d_width=8))
    run.ledger = PrivacyLedger("run", True, {}, "mechanism", {})
    for site in "ab":
        run.ledger.register_site(site, public_num_records=10)
    lost = SimpleNamespace(metadata=SimpleNamespace(src_node_id=1, reply_to_message_id="m7"), has_error=lambda: True,
                           error=SimpleNamespace(reason="<class 'Exception'>:<'node 7 is unavailable'>"))
    global_d = run.gan.d.state_dict()
    assert run.accept_replies(3, [7, 8], [lost], global_d, {"m7": 7, "m8": 8}) == ([], [], [])
    assert [(e["round"], e["event"]) for e in run.ledger.site("a")["events"]] == [(3, "failed")]
    assert "node 7 is unavailable" in run.ledger.site("a")["events"][0]["reason"]
    assert [(e["round"], e["event"]) for e in run.ledger.site("b")["events"]] == [(3, "no_reply")]


def test_a_refusal_carries_the_sites_running_total_into_the_ledger(tmp_path):
    """A round spent and then lost with the server (no event records it) is in the site's running total, which its
    refusal of the redone round reports: the ledger must not stay below it."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedpggan.privacy.ledger import PrivacyLedger
    from pggan_model import PGGAN, ModelShape
    from server.federated_run import FederatedRun

    run = FederatedRun.__new__(FederatedRun)
    run.cfg = tiny_config(tmp_path, clients=1, epsilon=10.0)
    run.sites = {7: {"site-id": "a"}}
    run.gan = PGGAN(ModelShape(28, 1, 2, latent_dim=8, g_width=8, d_width=8))
    run.ledger = PrivacyLedger("run", True, {}, "mechanism", {})
    run.ledger.register_site("a", public_num_records=10, budget_epsilon=10.0)
    run.ledger.record_round("a", 8, steps=8, epsilon=9.0)
    spend = {"epsilon": 10.0, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0, "total_steps": 80}
    refusal = SimpleNamespace(metadata=SimpleNamespace(src_node_id=7, reply_to_message_id="m7"), has_error=lambda: False,
                              content=RecordDict({"d": ArrayRecord(run.gan.d.state_dict()), "privacy": MetricRecord(spend),
                                                  "status": ConfigRecord({"status": "exhausted"})}))
    run.accept_replies(9, [7], [refusal], run.gan.d.state_dict(), {"m7": 7})
    assert run.ledger.site("a")["epsilon"] == 10.0 and run.ledger.site("a")["status"] == "exhausted"


def test_a_sites_epsilon_in_the_ledger_never_falls():
    from fedpggan.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger("run", True, {}, "mechanism", {})
    ledger.register_site("a")
    ledger.record_round("a", 1, steps=8, epsilon=2.0)
    ledger.record_round("a", 2, steps=8, epsilon=1.0)  # a broken or lying site's later, lower report
    assert ledger.site("a")["epsilon"] == 2.0
    ledger.record_round("a", 3, steps=8, epsilon=3.0)
    assert ledger.site("a")["epsilon"] == 3.0


def test_a_resume_keeps_later_spend_and_lets_the_redone_rounds_decide_a_sites_status_again():
    from fedpggan.privacy.ledger import PrivacyLedger, spent_outside_rounds

    ledger = PrivacyLedger("run", True, {}, "mechanism", {})
    for site in "ab":
        ledger.register_site(site)
        for r in (1, 2, 3):
            ledger.record_round(site, r, steps=8, epsilon=float(r))
    ledger.record_event("a", 3, "excluded", "after the checkpoint", "excluded")
    ledger.record_event("b", 1, "excluded", "before it", "excluded")
    for r in (1, 2, 3):
        ledger.record_checkpoint(r, f"ckpt_{r}.pt", f"sha{r}")
    ledger.resume_after(2, "now")
    a, b = ledger.site("a"), ledger.site("b")
    assert a["status"] == "active" and b["status"] == "excluded"  # only what happened after the checkpoint is redone
    assert [r["round"] for r in a["rounds"]] == [1, 2] and a["epsilon"] == 3.0  # the spend stays
    redone = [e for e in a["events"] if e["event"] == "spent_before_resume"]
    assert [(e["round"], e["steps"], e["epsilon"]) for e in redone] == [(3, 8, 3.0)] and spent_outside_rounds(redone[0])
    assert all(e["before_resume"] == "now" for e in a["events"])
    assert [bool(c.get("discarded")) for c in ledger.data["checkpoints"]] == [False, False, True]
    ledger.mark_replayed("a", 3)  # the site re-sent that reply: its spend is a recorded round again
    assert not spent_outside_rounds(redone[0])


# --- bad input: one line, no traceback, nothing lost --------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["simulate", "--clients", "0"], "--clients 0 is invalid"),
    (["simulate", "--dataset", "{npz}"], "corrupt.npz: unreadable or truncated npz"),
    (["simulate", "--resume", "{missing}"], "not found"),
    (["simulate", "--resume", "{missing}", "--rounds", "3"], "drop --rounds"),
    (["simulate", "--config", "{toml}"], "config.toml: invalid TOML"),
])
def test_bad_input_is_one_line_without_traceback(argv, needle, tmp_path):
    npz = tmp_path / "corrupt.npz"
    npz.write_bytes(b"PK\x03\x04 this is not a zip archive")
    toml = tmp_path / "config.toml"
    toml.write_text("rounds = [\n")
    argv = [a.format(npz=npz, missing=tmp_path / "nope", toml=toml) for a in argv]
    out = [] if "--resume" in argv else ["--out", str(tmp_path / "out")]  # --resume takes no other option
    proc = subprocess.run([sys.executable, "-m", "fedpggan.cli", *argv, *out],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    err = proc.stderr.strip()
    assert proc.returncode != 0
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


def test_a_config_value_of_the_wrong_kind_is_refused_not_converted(tmp_path):
    from fedpggan.config import coerce, load_toml

    with pytest.raises(FedPGGANError, match="option 'epsilon' = True is not a number"):  # TOML true is not epsilon 1
        coerce("epsilon", True, 10.0, "--config c.toml")
    with pytest.raises(FedPGGANError, match="option 'rounds' = True is not a whole number"):
        coerce("rounds", True, 60, "--config c.toml")
    with pytest.raises(FedPGGANError, match=r"option 'dataset' = \['a'\] is not text"):
        coerce("dataset", ["a"], "phantom", "--config c.toml")
    with pytest.raises(FedPGGANError, match="option 'lr-d' = nan is not a number"):
        coerce("lr_d", math.nan, 2e-4, "--config c.toml")
    assert coerce("embedding_noise_limit", "inf", 1.0, "--config c.toml") == math.inf  # infinity is a setting
    for text in ("fedpggan = 1\n", "rounds = 3\n[fedpggan]\nepsilon = 1.0\n"):  # an option would be dropped silently
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(FedPGGANError, match="either at the top of the file or under one \\[fedpggan\\] table"):
            load_toml(tmp_path / "c.toml")


def test_a_failing_command_leaves_the_run_folder_untouched(tmp_path, capsys):
    run = simulate(tiny_config(tmp_path / "run", rounds=1))
    before = {p: sha256_file(p) for p in run.rglob("*") if p.is_file()}
    assert main(["simulate", "--resume", str(run), "--rounds", "0"]) != 0  # resume takes no options
    assert main(["evaluate", str(run), "--real", str(tmp_path / "missing.npz")]) != 0
    assert main(["export", str(run), "--out", str(run)]) != 0  # would overwrite the run itself
    after = {p: sha256_file(p) for p in run.rglob("*") if p.is_file()}
    assert after == before


# --- property-based fuzzing ---------------------------------------------------------------
CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                          st.text(max_size=12), st.lists(st.integers(), max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(RunConfig().to_flower())), CONFIG_VALUES, max_size=6))
def test_fuzzed_run_configs_are_valid_or_one_line_errors(values):
    try:
        cfg = RunConfig.from_flower({**RunConfig().to_flower(), **values}).validate()
    except FedPGGANError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert cfg.clients >= 1 and cfg.rounds >= 1 and cfg.batch_size >= 1


TENSORS = st.builds(lambda shape, scale, bad: (torch.randn(shape) * scale).masked_fill(torch.rand(shape) < bad, math.nan),
                    st.sampled_from([(3,), (2, 2), (4, 1)]), st.floats(0, 1e6), st.sampled_from([0.0, 0.0, 0.3]))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), TENSORS, min_size=1, max_size=3))
def test_fuzzed_updates_never_crash_the_validator(update):
    reference = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    problem = update_problem(update, reference)
    assert problem is None or isinstance(problem, str)
    if any(not torch.isfinite(v).all() for v in update.values()):
        assert problem is not None
    if problem is None:  # what passes is usable: same names, shapes, finite, bounded
        assert update.keys() == reference.keys()
        assert update_norm(update, reference) <= MAX_RELATIVE_UPDATE * model_norm(reference)


NPZ_ARRAYS = st.fixed_dictionaries({}, optional={
    "train_images": st.builds(lambda n, s, dtype, nan: make_array((n, s, s), dtype, nan),
                              st.integers(0, 6), st.sampled_from([0, 1, 28, 30]),
                              st.sampled_from(["uint8", "float32", "int64", "U1"]), st.booleans()),
    "train_labels": st.builds(lambda n, width, dtype, nan: make_array((n, width), dtype, nan, high=12),
                              st.integers(0, 6), st.sampled_from([1, 2]),
                              st.sampled_from(["uint8", "int64", "float32"]), st.booleans()),
    "extra": st.just(np.zeros(3)),
})


def make_array(shape: tuple, dtype: str, nan: bool, high: int = 256) -> np.ndarray:
    if dtype == "U1":
        return np.full(shape, "x")
    out = np.random.default_rng(0).integers(-1, high, size=shape).astype(dtype)
    if nan and out.dtype.kind == "f" and out.size:
        out.flat[0] = np.nan
    return out


@settings(max_examples=120, deadline=None)
@given(NPZ_ARRAYS, st.integers(0, 3))
def test_fuzzed_npz_files_load_or_fail_in_one_line(arrays, truncate):
    from fedpggan.data import open_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site.npz"
        np.savez(path, **arrays)
        if truncate:  # a copy that stopped part-way
            path.write_bytes(path.read_bytes()[: path.stat().st_size * truncate // 4])
        try:
            data = open_dataset(str(path), "train")
        except FedPGGANError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:  # what loads is well formed
            assert len(data) == len(data.labels) > 0 and torch.isfinite(data.images).all()
            assert data.images.min() >= -1 and data.images.max() <= 1
            assert int(data.labels.min()) >= 0 and int(data.labels.max()) < data.num_classes


def test_when_no_site_can_describe_itself_the_error_quotes_a_site_not_a_guess(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import server.federated_run
    from server.federated_run import FederatedRun

    # outside a Flower run a Message cannot be built; what is sent does not matter here
    monkeypatch.setattr(server.federated_run, "Message", lambda content, dst_node_id, message_type, **_: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=dst_node_id, message_id=f"m{dst_node_id}")))
    failed = SimpleNamespace(metadata=SimpleNamespace(src_node_id=7), has_error=lambda: True,
                             error=SimpleNamespace(reason="<class 'ray.exceptions.OutOfMemoryError'>:<'worker killed: "
                                                          "the node is low on memory'>"))
    run = FederatedRun.__new__(FederatedRun)
    run.cfg = tiny_config(tmp_path, clients=1)
    run.grid = SimpleNamespace(get_node_ids=lambda: [7], send_and_receive=lambda messages, timeout: [failed])
    with pytest.raises(FedPGGANError, match=r"no site could describe its data \(node 7: worker killed: the node is low on memory\)"):
        run.discover_sites()


def discovered(tmp_path, monkeypatch, facts: dict[int, dict], **options):
    """What FederatedRun.discover_sites makes of sites answering with ``facts`` (node id -> facts),
    and the messages it sent."""
    from types import SimpleNamespace

    import server.federated_run
    from server.federated_run import FederatedRun

    sent = []
    monkeypatch.setattr(server.federated_run, "Message", lambda content, **kw: sent.append(kw) or SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=kw["dst_node_id"], message_id=f"m{kw['dst_node_id']}")))
    from flwr.app import ConfigRecord, RecordDict

    replies = [f if hasattr(f, "metadata") else  # a whole reply given (a failed one), else the content of a good one
               SimpleNamespace(metadata=SimpleNamespace(src_node_id=n), has_error=lambda: False,
                               content=RecordDict({"site": ConfigRecord(f)}) if isinstance(f, dict) else f)
               for n, f in facts.items()]
    run = FederatedRun.__new__(FederatedRun)
    run.cfg = tiny_config(tmp_path, **options)
    run.grid = SimpleNamespace(get_node_ids=lambda: list(facts), send_and_receive=lambda messages, timeout: replies)
    return run.discover_sites(), sent


def site_facts(site_id: str, records: int = 50, size: int = 28) -> dict:
    return {"site-id": site_id, "num-records": records, "image-size": size, "channels": 1, "class-names": ["a", "b"],
            "dataset": "site data", "is-medical": True}


def test_a_site_describing_no_data_set_is_left_out_not_a_crash(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from flwr.app import RecordDict

    broken = {8: site_facts("B", records=0), 9: RecordDict({}), 10: {**site_facts("D"), "class-names": "a,b"},
              11: SimpleNamespace(metadata=SimpleNamespace(src_node_id=11), has_error=lambda: True, content=None,
                                  error=SimpleNamespace(reason="<class 'MemoryError'>:<''>"))}  # an error with no message
    sites, _ = discovered(tmp_path, monkeypatch, {7: site_facts("A"), **broken}, clients=5, round_timeout=5.0)
    assert sorted(sites) == [7]
    printed = capsys.readouterr().out
    assert "node 11: failed with an error that has no message" in printed
    assert "node 8: 0 records of 28 px and 1 channel(s) is no data set" in printed
    assert "node 9: its answer holds no 'site' record" in printed and "node 10: 'class-names' = 'a,b' is not a list" in printed
    with pytest.raises(FedPGGANError, match="sites disagree on whether their data are medical"):
        discovered(tmp_path, monkeypatch, {7: site_facts("A"), 8: {**site_facts("B"), "is-medical": False}}, clients=2)


def test_sites_are_refused_before_any_spend_when_no_round_could_use_them(tmp_path, monkeypatch):
    sites, sent = discovered(tmp_path, monkeypatch, {7: site_facts("A"), 8: site_facts("B")}, clients=2, round_timeout=30.0)
    assert sorted(sites) == [7, 8] and {m["ttl"] for m in sent} == {30.0}  # a late site never answers a stale query
    with pytest.raises(FedPGGANError, match=r"site id 'A' is used by 2 SuperNodes \(nodes 7, 8\); give each site its own site-id"):
        discovered(tmp_path, monkeypatch, {7: site_facts("A"), 8: site_facts("A")}, clients=2)
    with pytest.raises(FedPGGANError, match=r"sites disagree .*\(A: 28 px, .*; B: 64 px, .*\); give every site"):
        discovered(tmp_path, monkeypatch, {7: site_facts("A"), 8: site_facts("B", size=64)}, clients=2)
    with pytest.raises(FedPGGANError, match="2 site\\(s\\) answered, fewer than --min-clients 3; start more SuperNodes"):
        discovered(tmp_path, monkeypatch, {7: site_facts("A"), 8: site_facts("B")}, clients=4, min_clients=3,
                   round_timeout=1.0)  # waits that long for the other 2


def test_the_server_chooses_and_records_the_generator_steps_by_the_sites_noise(capsys):
    from types import SimpleNamespace

    from server.federated_run import FederatedRun

    for epsilon, steps in ((10.0, 8), (1.0, 2)):
        run = FederatedRun.__new__(FederatedRun)
        run.cfg = RunConfig(epsilon=epsilon, rounds=60, local_steps=8, delta=1e-5)
        run.ledger = SimpleNamespace(data={"sites": {str(n): {"public_num_records": 942} for n in range(5)}})  # PneumoniaMNIST's
        run.expected_mechanism, run.run_info, run.resume = {}, {}, False
        run.folder = SimpleNamespace(save_ledger=lambda *a: None)
        assert run.choose_generator_steps() == steps
        recorded = run.run_info["generator_steps"]
        assert recorded["per_round"] == steps and recorded["chosen_by"] == "--g-steps 0: noise vs 0.012"
        assert f"generator steps per round: {steps} (--g-steps 0: the averaged discriminator's DP noise is" in capsys.readouterr().out
    run.resume, run.expected_mechanism = True, {}  # a resumed run keeps the steps it began with, whatever it would choose now
    run.cfg = dataclasses.replace(run.cfg, epsilon=10.0)
    assert run.choose_generator_steps() == 2 and capsys.readouterr().out == ""
    run.resume, run.run_info = False, {}
    run.cfg = RunConfig(epsilon=1.0, rounds=60, local_steps=8, delta=1e-5, g_steps=5)
    assert run.choose_generator_steps() == 5 and run.run_info["generator_steps"]["chosen_by"] == "--g-steps"
    assert run.run_info["generator_steps"]["averaged_d_noise"] is None
    for training, noise in (("server", 0.0081), ("local", 0.0180)):  # local: each site's G learns from its own D
        run.cfg, run.expected_mechanism = RunConfig(epsilon=10.0, rounds=60, local_steps=8, delta=1e-5, generator_training=training), {}
        assert run.averaged_d_noise() == pytest.approx(noise, abs=5e-5)


def test_a_run_stops_before_a_round_that_cannot_reach_min_clients():
    from types import SimpleNamespace

    from server.federated_run import FederatedRun

    run = FederatedRun.__new__(FederatedRun)
    run.cfg = RunConfig(clients=4, fraction=1.0, min_clients=3)
    active = [1, 2, 3]
    run.active_nodes = lambda: active
    assert run.no_round_can_succeed() is None
    active.pop()
    assert "selects 2, fewer than --min-clients 3" in run.no_round_can_succeed()
    run.cfg = RunConfig(clients=4, fraction=0.5, min_clients=2)
    active[:] = [1, 2, 3, 4]
    assert run.no_round_can_succeed() is None
    active.pop()  # ceil(0.5 * 3) = 2 still
    active.pop()
    assert "--fraction 0.5 of the 2 active site(s) selects 1" in run.no_round_can_succeed()
    run.sites = {7: site_facts("A", 50), 8: site_facts("C", 50)}
    run.ledger = SimpleNamespace(data={"sites": {"A": {"public_num_records": 50}, "B": {"public_num_records": 50}}})
    with pytest.raises(FedPGGANError, match="site 'C' is not one of this run's sites \\(A, B\\)"):
        run.check_sites_match_ledger()
    run.sites = {7: site_facts("A", 51)}
    with pytest.raises(FedPGGANError, match="site 'A' now holds 51 images, 50 when the run began"):
        run.check_sites_match_ledger()


def test_fraction_samples_the_same_sites_whatever_node_ids_flower_draws():
    from server.federated_run import sample_sites

    names = ["0", "1", "2", "3"]
    big = dict(zip([2**64 - 5, 2**63 + 7, 12345, 2**63 - 1], names))  # Flower's node IDs are unsigned 64-bit
    small = dict(zip([40, 3, 17, 8], names))  # the same sites after a restart: other node IDs
    for seed in range(20):
        picked = sample_sites(big, 0.5, seed)
        assert len(picked) == 2 and set(picked) <= set(big) and all(isinstance(n, int) for n in picked)
        assert {big[n] for n in picked} == {small[n] for n in sample_sites(small, 0.5, seed)}
        assert picked == sample_sites(dict(reversed(list(big.items()))), 0.5, seed)  # independent of reply order
    assert sample_sites(big, 1.0, 0) == sorted(big)


def test_an_atomic_write_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """Without the folder's fsync a power loss may undo the rename: the ledger would lose an entry
    that a checkpoint written after it relies on."""
    import os
    import stat

    from fedpggan.io import atomic_write_bytes

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    atomic_write_bytes(tmp_path / "ledger.json", b"{}")
    assert synced == [False, True] and (tmp_path / "ledger.json").read_bytes() == b"{}"


@pytest.mark.parametrize("handler", ["release_keys", "release_masked", "release_reveal", "train"])
def test_every_site_handler_opens_the_sites_state_only_under_its_lock(tmp_path, monkeypatch, handler):
    """A stale ClientApp of a crashed run, or a second one of the same run, must not interleave with
    another on the site's privacy state: each handler loads it holding the run's OS lock, which no
    other open of the lock file (here: in this process, as another process would) can then take."""
    import fcntl
    from types import SimpleNamespace

    import client.client_app as client_app
    from client.site import run_folder
    from fedpggan.privacy.secure_sum import new_key_pair

    class Loaded(Exception):
        """Raised where the handler loads the state: what happens next is other tests' concern."""

    seen = []

    def load(root, run_id):
        with open(run_folder(root, run_id) / ".lock", "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        raise Loaded

    monkeypatch.setattr(client_app.SiteState, "load", staticmethod(load))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the train handler sizes a simulated site's threads
    raw = {**tiny_config(tmp_path, epsilon=1.0).to_flower(), "run-id": "run", "round": 1,
           "site-state-root": str(tmp_path / "sites")}
    publics = [new_key_pair()[1] for _ in range(3)]
    msg = SimpleNamespace(content={"config": raw, "keys": {"public-keys": publics}})
    with pytest.raises(FedPGGANError) as caught:
        getattr(client_app, handler)(msg, SimpleNamespace(node_config={"partition-id": 0, "num-partitions": 3}))
    assert isinstance(caught.value.__cause__, Loaded) and seen == ["held"]


def test_the_soak_refuses_to_replace_todays_results_before_it_trains(tmp_path, capsys, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("soak_under_test", REPO / "benchmarks" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    stem = tmp_path / f"soak-cpu-5x6-{fix_today(monkeypatch, soak)}"  # a quick look has its own file: it never blocks the soak
    stem.with_suffix(".md").write_text("today's soak")
    with pytest.raises(SystemExit) as stopped:
        soak.main(["--sites", "5", "--rounds", "6", "--work", str(tmp_path / "work"), "--results", str(tmp_path)])
    assert stopped.value.code == 2 and f"{stem}.md: already exists" in capsys.readouterr().err
    assert stem.with_suffix(".md").read_text() == "today's soak" and not (tmp_path / "work").exists()


@pytest.mark.parametrize("sigma", [0.0, 25.0])
def test_a_release_its_sites_record_count_does_not_allow_is_rejected(sigma):
    """One site's release sets every class's target unless it is bounded: an honest one (norm-1 records plus noise)
    passes, one scaled up or counting other records than the site declared does not."""
    from fedpggan.data import open_dataset
    from fedpggan.privacy.feature_release import features_for, release_sum
    from fedpggan.privacy.noise import SeededNoise
    from server.validation import release_problem

    data = open_dataset("phantom", "train").subset(np.arange(200))
    features = features_for((1, 28, 28), 500, seed=0)
    honest = release_sum(features, data.images, data.labels, 2, 0.1, sigma or None, SeededNoise(0)).double()
    assert release_problem(honest, 200, sigma, 0.1) is None
    assert "above what 200 records of norm 1" in release_problem(honest * 3, 200, sigma, 0.1)
    if not sigma:  # 200 records, 100 declared: without noise that shows (under noise this large it need not)
        assert "above what 100 records of norm 1" in release_problem(honest, 100, sigma, 0.1)
    miscounted = honest.clone()
    miscounted[-1] += 1000 * math.sqrt(0.1)  # 1000 records more per class than the site holds: every mean shrinks
    refused = release_problem(miscounted, 200, sigma, 0.1)
    assert "not the 200 the site declared" in refused if sigma else "above what 200 records" in refused
    if not sigma:  # every feature in class 0, every count in class 1: class 0's "mean" would be huge (hidden by noise this large)
        shifted = honest.clone()
        shifted[:-1, 0], shifted[:-1, 1] = honest[:-1].sum(1), 0.0
        shifted[-1, 0], shifted[-1, 1] = 0.0, honest[-1].sum()
        assert "class 0 features" in release_problem(shifted, 200, sigma, 0.1)


def test_a_resume_refuses_a_missing_or_swapped_secure_sum(tmp_path):
    """The sites revealed their seeds once: the sum cannot be made again, and another file would change the target."""
    from fedpggan.runs import RunFolder
    from server.federated_run import FederatedRun

    run = FederatedRun.__new__(FederatedRun)
    run.folder = RunFolder(tmp_path)
    run.run_info = {"secure_release": {"sites": ["a", "b"], "sha256": "0" * 64}}
    with pytest.raises(FedPGGANError, match="secure_release_sum.pt: missing, but this run made its secure sum"):
        run.secure_release()
    torch.save(torch.zeros(3, 2), run.folder.secure_release)
    with pytest.raises(FedPGGANError, match="not the secure sum this run made"):
        run.secure_release()
