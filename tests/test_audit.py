"""``fedpggan audit``: the accounting audit catches each kind of tampering, the accountants
agree with each other and with published values, and membership inference can tell an
overfit discriminator from a DP one."""

from __future__ import annotations

import contextlib
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedpggan.audit import accountants, attack_metrics, epsilon_lower_bound
from fedpggan.audit.findings import close, slack
from fedpggan.audit.mechanism_checks import check_mechanism
from fedpggan.audit.mia import class_matched
from fedpggan.audit.mia_attacks import discriminator_scores, distance_scores
from fedpggan.audit.mia_data import member_sets
from fedpggan.errors import FedPGGANError
from fedpggan.audit.records import Round, RunFacts, Site
from fedpggan.audit.round_checks import check_rounds
from fedpggan.cli import main
from fedpggan.data import ImageDataset, open_phantom
from fedpggan.io import sha256_file, sha256_json
from fedpggan.runs import RunFolder
from fedpggan.privacy import DiscriminatorTrainer, PrivacySettings, epsilon_of, extend_history
from fedpggan.privacy.ledger import epsilon_bound, unreported_round
from fedpggan.privacy.dp_discriminator import sample_rate
from fedpggan.train import train_centralised
from pggan_model import PGGAN, GANConfig, ModelShape

SIZE = 16
MIA_MEMBERS, MIA_BATCH, MIA_STEPS, MIA_DELTA = 64, 32, 100, 1e-3


@contextlib.contextmanager
def one_thread():
    """Tiny convolutions gain nothing from threads, which only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_tiny_npz(path, n_train: int, n_test: int) -> str:
    """A MedMNIST-layout npz of phantom images: small enough for many epochs in seconds."""
    def u8(ds):
        return ((ds.images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    train = open_phantom("train", n=n_train, image_size=SIZE, seed=3)
    test = open_phantom("test", n=n_test, image_size=SIZE, seed=3)
    np.savez(path, train_images=u8(train), train_labels=train.labels.numpy(), val_images=u8(test),
             val_labels=test.labels.numpy(), test_images=u8(test), test_labels=test.labels.numpy())
    return str(path)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 128, 128)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, tiny_npz):
    """A clean DP run (epsilon 1, 3 epochs, a checkpoint per epoch); tests copy it before editing."""
    out = tmp_path_factory.mktemp("dp") / "run"
    with one_thread():
        train_centralised(tiny_config(out, dataset=tiny_npz, image_size=SIZE, epochs=3, epsilon=1.0, g_width=8,
                                      checkpoint_every=1, keep_checkpoints=3, device="cpu"))
    return out


@pytest.fixture
def run_copy(dp_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(dp_run, dst)
    return dst


def audit(run, *extra) -> tuple[int, dict]:
    code = main(["audit", str(run), *extra])
    report = json.loads((run / "audit.json").read_text()) if (run / "audit.json").exists() else {}
    return code, report


def edit_ledger(run, edit, rehash: bool = True) -> None:
    """Apply ``edit`` to the ledger; with ``rehash`` also update run.json's ledger hash, so the
    specific check (not the hash check) is what must catch it."""
    path = run / "privacy_ledger.json"
    ledger = json.loads(path.read_text())
    edit(ledger)
    path.write_text(json.dumps(ledger, indent=2))
    if rehash:
        info = json.loads((run / "run.json").read_text())
        info["ledger_sha256"] = sha256_file(path)
        (run / "run.json").write_text(json.dumps(info, indent=2))


def fields(report: dict) -> list[str]:
    return [v["field"] for v in report["violations"]]


# --- accounting audit ---------------------------------------------------------------------

def test_clean_run_passes_with_three_agreeing_accountants(run_copy, capsys):
    code, report = audit(run_copy)
    assert code == 0, report["violations"]
    assert report["passed"] and report["violations"] == []
    row = report["sites"]["central"]
    assert set(row["recomputed"]) == {"rdp", "prv", "pld"}
    assert close(row["claimed_epsilon"], row["recomputed"]["prv"])      # the declared accountant reproduces
    assert close(row["recomputed"]["pld"], row["recomputed"]["prv"])    # two numerical accountants agree
    assert row["recomputed"]["rdp"] >= row["tightest_epsilon"]          # RDP is the loosest bound
    assert row["tightest_epsilon"] <= 1.0 + 0.03
    # replace-one (counts public) is reported beside it: looser than add/remove, at most about twice
    assert row["recomputed"]["pld"] < row["replace_one_epsilon"] <= 2.5 * row["recomputed"]["pld"]
    assert row["replace_one_basis"] == "recorded rounds"
    assert {"opacus", "dp-accounting"} <= set(report["versions"]["audit"])
    assert (run_copy / "AUDIT.md").read_text().count("central") >= 1
    assert (run_copy / "audit_epsilon.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "replace-one" in out.splitlines()[0]  # the table's header


def halve_everywhere(ledger, field):
    """Halve ``field`` in the site's mechanism and in every round it recorded."""
    site = ledger["sites"]["central"]
    site[field] /= 2
    for r in site["rounds"]:
        r[field] /= 2


def halve_noise(ledger):
    halve_everywhere(ledger, "noise_multiplier")


def remove_round(ledger):
    del ledger["sites"]["central"]["rounds"][1]


def change_sample_rate(ledger):
    halve_everywhere(ledger, "sample_rate")


def lower_epsilon(ledger):
    site = ledger["sites"]["central"]
    site["epsilon"] /= 2
    site["rounds"][-1]["epsilon"] /= 2
    ledger["guarantee"]["epsilon"] /= 2


def hide_release(ledger):
    """Drop the one-shot embedding release: the rounds alone no longer explain the claim."""
    del ledger["sites"]["central"]["feature_release"]


def raise_delta(ledger):
    """A larger delta than the run's default (config delta 0: min(1e-5, 1/(10 n)))."""
    ledger["sites"]["central"]["delta"] *= 5


def lower_epsilon_slightly(ledger):
    """1.5 % under the declared accountant: inside the 2 % + 0.01 tolerance the audit once allowed."""
    site = ledger["sites"]["central"]
    site["epsilon"] *= 0.985
    site["rounds"][-1]["epsilon"] *= 0.985
    ledger["guarantee"]["epsilon"] = site["epsilon"]


def spend_just_past_the_budget(ledger):
    """Noise 2 % under the calibrated level, every claim recomputed to match: a consistent ledger of a
    site that spent a little more than its budget (within the tolerance the audit once allowed)."""
    site = ledger["sites"]["central"]
    site["noise_multiplier"] *= 0.98
    release = site["feature_release"]
    history = [(release["noise_multiplier"], 1.0, 1)]
    for r in site["rounds"]:
        r["noise_multiplier"] = site["noise_multiplier"]
        history = extend_history(history, r["noise_multiplier"], r["sample_rate"], r["steps"])
        r["epsilon"] = epsilon_of(history, site["delta"], site["accountant"])
    site["epsilon"] = ledger["guarantee"]["epsilon"] = site["rounds"][-1]["epsilon"]
    assert site["budget_epsilon"] < site["epsilon"] < site["budget_epsilon"] + slack(site["budget_epsilon"])


def raise_budget(ledger):
    """The ledger's budget above the run's --epsilon: a spend judged against a budget nobody set."""
    ledger["sites"]["central"]["budget_epsilon"] *= 2


def change_accountant(ledger):
    """Another accountant than the run's --accountant names the claim."""
    site = ledger["sites"]["central"]
    site["accountant"] = "rdp" if site["accountant"] == "prv" else "prv"


def double_clip(ledger):
    """Noise scaled to a clipping norm other than the run's --max-grad-norm."""
    ledger["sites"]["central"]["max_grad_norm"] *= 2


def drop_clip(ledger):
    """No clipping norm at all: nothing left to check the noise's scale against."""
    del ledger["sites"]["central"]["max_grad_norm"]


def plan_more_steps(ledger):
    """A plan of more steps than the run's config gives (a calibration for another length)."""
    ledger["sites"]["central"]["planned_steps"] += 10


def under_report_an_earlier_round(ledger):
    """Only round 1's claim halved: the final claim is right, the curve before it is not."""
    ledger["sites"]["central"]["rounds"][0]["epsilon"] /= 2


@pytest.mark.parametrize("edit, field, words", [
    (halve_noise, "sites.central.noise_multiplier", "calibrated"),
    (raise_budget, "sites.central.budget_epsilon", "but run.json config epsilon is"),
    (change_accountant, "sites.central.accountant", "but the config says"),
    (double_clip, "sites.central.max_grad_norm", "but the config clips at"),
    (plan_more_steps, "sites.central.planned_steps", "but the config gives"),
    (under_report_an_earlier_round, "sites.central.rounds[0].epsilon", "under-reported"),
    (spend_just_past_the_budget, "sites.central.epsilon", "exceeds the budget"),
    (spend_just_past_the_budget, "sites.central.noise_multiplier", "above the budget"),
    (lower_epsilon_slightly, "sites.central.epsilon", "under-reported"),
    (raise_delta, "sites.central.delta", "exceeds the default min(1e-5, 1/(10 n))"),
    (hide_release, "sites.central.rounds", "spend is missing"),
    (remove_round, "sites.central.rounds", "round(s) 2 missing"),
    (change_sample_rate, "sites.central.sample_rate", "batch-size"),
    (lower_epsilon, "sites.central.epsilon", "under-reported"),
])
def test_each_tampering_fails_naming_the_field(run_copy, edit, field, words):
    edit_ledger(run_copy, edit)
    code, report = audit(run_copy)
    assert code == 1
    assert "run.json:ledger_sha256" not in fields(report)
    reasons = [v["reason"] for v in report["violations"] if v["field"] == field]
    assert any(words in r for r in reasons), report["violations"]
    assert not report["sites"]["central"]["passed"]


def test_a_ledger_without_its_clipping_norm_fails(run_copy):
    edit_ledger(run_copy, drop_clip)
    code, report = audit(run_copy)
    assert code == 1
    assert any(v["field"] == "sites.central.max_grad_norm" and "missing" in v["reason"] for v in report["violations"])


@pytest.mark.parametrize("damage", [
    lambda ledger: ledger["sites"]["central"]["rounds"][0].update(round=None),
    lambda ledger: ledger["sites"]["central"]["rounds"].append("round 9"),
    lambda ledger: ledger["sites"].update(other="a site"),
    lambda ledger: ledger["sites"]["central"].update(events=5),  # these three were tracebacks
    lambda ledger: ledger["sites"]["central"].update(rounds={"a": 1}),
    lambda ledger: ledger["sites"]["central"].update(public_num_records=0),
    lambda ledger: ledger["sites"]["central"]["events"].append({"round": "2", "event": "failed", "reason": "x"}),  # was round 0
    lambda ledger: ledger["sites"]["central"]["events"].append({"round": 10**12, "event": "failed", "reason": "x"}),  # hung
])
def test_a_damaged_ledger_is_a_finding_not_a_crash(run_copy, damage):
    edit_ledger(run_copy, damage)
    code, report = audit(run_copy)
    assert code == 1 and report["violations"]


def test_steps_the_ledger_records_outside_its_rounds_count_in_the_recomputed_epsilon(run_copy):
    """A round charged before a crash and redone with other inputs is in the ledger as an event with
    its steps: the recomputed epsilon includes them, so a claim over the recorded rounds only fails."""
    code, clean = audit(run_copy)
    steps = clean["sites"]["central"]["steps"]
    edit_ledger(run_copy, lambda ledger: ledger["sites"]["central"]["events"].append(
        {"round": 2, "event": "unrecorded_spend", "steps": steps, "reason": "charged before a crash"}))
    code, report = audit(run_copy)
    row = report["sites"]["central"]
    assert code == 1 and row["unrecorded_steps"] == steps
    assert row["tightest_epsilon"] > clean["sites"]["central"]["tightest_epsilon"]
    assert "sites.central.epsilon" in fields(report)  # the claim covers the recorded rounds only: under-reported
    assert any(f"{2 * steps} steps taken ({steps} of them outside the recorded rounds)" in v["reason"]
               for v in report["violations"])


def test_the_verdict_is_bound_to_the_ledger_bytes_it_read(run_copy, monkeypatch):
    """A run still training may save its ledger while the audit runs: the report names the hash of
    the ledger it judged, never that of a newer one."""
    import fedpggan.audit.runner as runner

    judged = sha256_file(run_copy / "privacy_ledger.json")
    real = runner.audit_ledger_sites

    def ledger_saved_meanwhile(*args, **kwargs):
        out = real(*args, **kwargs)
        path = run_copy / "privacy_ledger.json"
        path.write_text(path.read_text() + " ")  # the trainer's next save
        return out

    monkeypatch.setattr(runner, "audit_ledger_sites", ledger_saved_meanwhile)
    report = runner.audit_run(run_copy)
    assert report["content"]["ledger_sha256"] == judged != sha256_file(run_copy / "privacy_ledger.json")


def test_a_malformed_checkpoint_index_is_one_line(run_copy, capsys):
    for text in ('{"a": 1}', '[{"round": 1}]'):
        (run_copy / "checkpoints" / "index.json").write_text(text)
        assert main(["audit", str(run_copy)]) == 2
        err = capsys.readouterr().err.strip()
        assert "index.json: not a list of {round, file, sha256} entries; restore it from backup" in err and "\n" not in err


def test_halved_noise_is_also_an_under_report_over_budget(run_copy):
    edit_ledger(run_copy, halve_noise)
    _, report = audit(run_copy)
    assert {"sites.central.epsilon", "sites.central.budget_epsilon"} <= set(fields(report))
    assert report["sites"]["central"]["tightest_epsilon"] > 2.0


def test_editing_the_ledger_without_the_run_hash_is_detected(run_copy):
    edit_ledger(run_copy, lambda ledger: ledger["assumptions"].append("harmless-looking edit"), rehash=False)
    code, report = audit(run_copy)
    assert code == 1 and fields(report) == ["run.json:ledger_sha256"]


def test_an_option_edited_in_run_json_is_detected(run_copy):
    """run.json is not hashed itself: the ledger's record of its options catches an edit (here the
    noise key, which would otherwise decide whether a seeded run passes)."""
    info = json.loads((run_copy / "run.json").read_text())
    info["config"]["max-grad-norm"] = 0.5
    (run_copy / "run.json").write_text(json.dumps(info, indent=2))
    code, report = audit(run_copy)
    assert code == 1 and "run.json:config" in fields(report)


def test_a_seeded_run_fails_even_if_run_json_is_edited_to_say_secret(tmp_path, tiny_npz):
    with one_thread():
        run = train_centralised(tiny_config(tmp_path / "seeded", dataset=tiny_npz, image_size=SIZE, epsilon=2.0,
                                            noise_key="seed", device="cpu"))
    info = json.loads((run / "run.json").read_text())
    info["config"]["noise-key"] = "secret"
    (run / "run.json").write_text(json.dumps(info, indent=2))
    code, report = audit(run)
    assert code == 1 and {"run.json:config", "config.noise-key"} <= set(fields(report))


def test_an_option_added_to_run_json_since_the_checkpoint_is_an_edit(run_copy):
    """A run saved before --noise-key existed has no options hash in its ledger and checkpoints
    without that option: writing noise-key "secret" into its run.json must not pass as its setting."""
    from fedpggan.audit.integrity import check_config_in_checkpoint

    newest = sorted((run_copy / "checkpoints").glob("ckpt_*.pt"))[-1]
    payload = torch.load(newest, weights_only=False)
    del payload["run_config"]["noise-key"]  # as a checkpoint of that time was written
    torch.save(payload, newest)
    info = json.loads((run_copy / "run.json").read_text())
    found = check_config_in_checkpoint(info, RunFolder(run_copy), [{"status": "verified", "file": newest.name}])
    assert [f.field for f in found] == ["run.json:config"] and "noise-key" in found[0].reason
    del info["config"]["noise-key"]
    assert check_config_in_checkpoint(info, RunFolder(run_copy), [{"status": "verified", "file": newest.name}]) == []


def test_swapped_checkpoint_fails_and_rotated_one_does_not(tmp_path, tiny_npz):
    with one_thread():  # retention (--keep-checkpoints 2) deletes epoch 1's checkpoint
        run = train_centralised(tiny_config(tmp_path / "run", dataset=tiny_npz, image_size=SIZE, epochs=3, epsilon=1.0,
                                            g_width=8, checkpoint_every=1, keep_checkpoints=2, device="cpu"))
    ckpts = run / "checkpoints"
    code, report = audit(run)
    assert code == 0 and report["checkpoints"][0]["status"] == "not present (rotated)"
    (ckpts / "ckpt_00003.pt").write_bytes((ckpts / "ckpt_00002.pt").read_bytes())
    code, report = audit(run)
    assert code == 1 and fields(report) == ["checkpoints[2].sha256"]
    assert "ckpt_00003.pt" in report["violations"][0]["reason"]


def test_options_edited_in_run_json_and_the_ledger_together_still_disagree_with_the_checkpoints(run_copy):
    info = json.loads((run_copy / "run.json").read_text())
    info["config"]["ema-decay"] = 0.9  # an option no other check reads
    (run_copy / "run.json").write_text(json.dumps(info))
    edit_ledger(run_copy, lambda ledger: ledger.update(config_sha256=sha256_json(info["config"])))
    code, report = audit(run_copy)
    assert code == 1 and fields(report) == ["run.json:config"]
    assert "ema-decay in run.json differ from the options checkpoints/ckpt_00003.pt" in report["violations"][0]["reason"]


@pytest.mark.parametrize("deleted", [["ckpt_00003.pt"], ["ckpt_00001.pt"], ["ckpt_00001.pt", "ckpt_00002.pt", "ckpt_00003.pt"]])
def test_a_checkpoint_retention_keeps_that_is_gone_fails(run_copy, deleted):
    """--keep-checkpoints 3 keeps all three: a missing one was deleted by something else."""
    for name in deleted:
        (run_copy / "checkpoints" / name).unlink()
    code, report = audit(run_copy)
    assert code == 1 and fields(report) == [f"checkpoints[{int(n[5:10]) - 1}].file" for n in deleted]
    assert {c["status"] for c in report["checkpoints"] if c["file"] in deleted} == {"MISSING"}
    assert "retention keeps the newest 3" in report["violations"][0]["reason"]


def test_missing_ledger_cannot_be_audited(run_copy, capsys):
    (run_copy / "privacy_ledger.json").unlink()
    assert main(["audit", str(run_copy)]) == 2
    assert "privacy_ledger.json" in capsys.readouterr().err


def test_run_without_dp_fails_the_audit(tmp_path, tiny_npz):
    out = tmp_path / "run"
    with one_thread():
        train_centralised(tiny_config(out, dataset=tiny_npz, image_size=SIZE, g_width=8, device="cpu"))
    code, report = audit(out)
    assert code == 1 and fields(report) == ["dp"]
    assert "no differential privacy" in report["violations"][0]["reason"]


def test_accountants_reproduce_published_values():
    """MNIST DP-SGD, q = 256/60000, delta = 1e-5 (TensorFlow Privacy tutorials/README.md, after
    Abadi et al. 2016): sigma 1.12 for 60 epochs is eps 2.92, sigma 1.2 for 10 epochs is 1.20,
    with the classic RDP conversion eps = min_a rdp(a) - log(delta)/(a-1). Opacus' RDP uses the
    tighter conversion of Balle et al. 2020, and PRV/PLD are tighter still and agree."""
    from opacus.accountants.analysis.rdp import compute_rdp

    q = 256 / 60000
    orders = np.array(accountants.RDP_ORDERS)
    for sigma, epochs, published in ((1.12, 60, 2.92), (1.2, 10, 1.20)):
        history = ((sigma, q, epochs * 60000 // 256),)
        rdp = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=history[0][2], orders=orders))
        assert abs(float(np.min(rdp - math.log(1e-5) / (orders - 1))) - published) < 0.01
        values, errors = accountants.recompute(history, 1e-5)
        assert not errors
        assert values["pld"] <= values["rdp"] <= published and values["prv"] <= values["rdp"]
        assert close(values["pld"], values["prv"])
        assert values["prv"] > 0.6 * published  # tight accounting saves 10-35% here, not more


def test_replace_one_is_add_remove_at_twice_the_sensitivity_without_sampling():
    """A swapped record moves a sum of unit vectors by up to 2: for the Gaussian mechanism (q = 1)
    replace-one at sigma equals add/remove at sigma / 2; with Poisson sampling it lies between
    add/remove at sigma and at sigma / 2."""
    assert accountants.replace_one_epsilon(((4.0, 1.0, 1),), 1e-5) == pytest.approx(
        accountants.epsilon("pld", ((2.0, 1.0, 1),), 1e-5), rel=1e-6)
    sampled = ((1.0, 0.05, 500),)
    assert (accountants.epsilon("pld", sampled, 1e-5) < accountants.replace_one_epsilon(sampled, 1e-5)
            < accountants.epsilon("pld", ((0.5, 0.05, 500),), 1e-5))


def test_rdp_curve_matches_the_accountant_round_by_round():
    rounds = [((1.0, 0.05, 10),), ((1.0, 0.05, 10),), ((0.8, 0.05, 5),)]
    curve = accountants.rdp_curve(rounds, 1e-5)
    assert curve[0] < curve[1] < curve[2]
    assert math.isclose(curve[-1], accountants.epsilon("rdp", ((1.0, 0.05, 20), (0.8, 0.05, 5)), 1e-5), rel_tol=1e-9)


# --- federated ledgers (format of server/federated_run.py) ----------------------------------

def federated_site(rounds: list[int], events: list[dict], steps: int = 2) -> tuple[Site, RunFacts]:
    """Site "0" of a 4-round federated run (2 local steps), its budget what its sigma spends."""
    n, batch, planned, delta, sigma = 200, 32, 4 * 2, 1e-5, 1.0
    q = sample_rate(n, batch)
    budget = accountants.epsilon("rdp", ((sigma, q, planned),), delta)
    site = Site("0", budget, delta, "rdp", sigma, q, 1.0, planned, n, 1.0, "active",
                [Round(r, steps, sigma, q, delta, 0.5 + 0.1 * i) for i, r in enumerate(rounds)], events)
    site.epsilon = site.rounds[-1].epsilon
    config = {"batch-size": batch, "local-steps": 2, "rounds": 4, "epsilon": budget, "delta": 0.0, "accountant": "rdp",
              "max-grad-norm": 1.0, "fraction": 1.0}
    return site, RunFacts("federated", config, "completed", n, end_round=4)


def test_federated_round_gaps_need_an_event():
    site, facts = federated_site([1, 2, 4], [{"round": 3, "event": "failed", "reason": "site error"}])
    assert check_rounds(site, facts)[0] == [] and check_mechanism(site, facts) == []
    site, facts = federated_site([1, 2, 4], [])
    assert [f.field for f in check_rounds(site, facts)[0]] == ["sites.0.rounds"]


@pytest.mark.parametrize("event", ["rejected_release", "recovered", "anything"])
def test_only_an_event_that_stands_for_a_round_explains_its_gap(event):
    site, facts = federated_site([1, 2, 4], [{"round": 3, "event": event, "reason": "..."}])
    assert "round(s) 3 missing" in " ".join(f.reason for f in check_rounds(site, facts)[0])
    site, facts = federated_site([1, 2, 3, 4], [{"round": 3, "event": event, "reason": "..."}])
    assert bool(check_rounds(site, facts)[0]) == (event == "anything")  # an unknown event is a finding of its own


def test_a_round_failed_after_the_last_report_counts_the_site_at_its_budget():
    """A site reserves a round's spend before it trains: if its reply never arrives and no later reply
    carries its cumulative epsilon, the guarantee must not stay at the last claim."""
    from fedpggan.audit.spend import check_guarantee
    from fedpggan.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger("r", True, {}, "dp-sgd", {})
    for site in ("0", "1"):
        ledger.register_site(site, budget_epsilon=4.0, delta=1e-5)
        ledger.record_round(site, 1, steps=2, epsilon=1.5)
    ledger.record_event("1", 2, "no_reply", "timeout")
    ledger.update_guarantee()
    assert ledger.data["guarantee"]["epsilon"] == 4.0
    assert ledger.data["guarantee"]["counted_at_budget"]["sites"] == {"1": 2}
    assert check_guarantee(ledger.data) == []
    stale = {**ledger.data, "guarantee": {**ledger.data["guarantee"], "epsilon": 1.5}}  # what the ledger said before
    assert [f.field for f in check_guarantee(stale)] == ["guarantee.epsilon"]
    cautious = {**ledger.data, "guarantee": {**ledger.data["guarantee"], "epsilon": 9.0}}  # above the bound: safe
    assert check_guarantee(cautious) == []
    ledger.record_round("1", 3, steps=2, epsilon=2.5)  # a later cumulative claim covers round 2
    ledger.update_guarantee()
    assert ledger.data["guarantee"]["epsilon"] == 2.5 and "counted_at_budget" not in ledger.data["guarantee"]
    site, facts = federated_site([1], [{"round": 2, "event": "no_reply", "reason": "timeout"}])
    facts = RunFacts("federated", facts.config, "completed", facts.num_records, end_round=2)
    assert any("counts the site at its budget" in n for n in check_rounds(site, facts)[1])
    # a later report that a resume moved out of the rounds (its claim kept in the event) covers a round lost before
    # that resume: no bound then
    entry = {"epsilon": 2.0, "budget_epsilon": 4.0, "rounds": [{"round": 1}],
             "events": [{"round": 2, "event": "no_reply", "before_resume": "t"},
                        {"round": 3, "event": "spent_before_resume", "epsilon": 2.0, "steps": 2, "before_resume": "t"}]}
    assert unreported_round(entry) is None and epsilon_bound(entry) == 2.0
    # but not a round lost after it: round numbers repeat, and the redone round 2 was charged again
    entry["events"].append({"round": 2, "event": "no_reply"})
    assert unreported_round(entry) == 2 and epsilon_bound(entry) == 4.0
    # a round recorded after that covers both losses
    entry["rounds"].append({"round": 3})
    assert unreported_round(entry) is None
    # a round lost before a resume is covered by the same round redone since (later in time, though not a later number)
    redone = {"epsilon": 2.0, "budget_epsilon": 4.0, "rounds": [{"round": 1}, {"round": 5}],
              "events": [{"round": 5, "event": "no_reply", "before_resume": "t"}]}
    assert unreported_round(redone) is None
    # a report of an earlier stretch (another resume's) does not cover a loss of a later one
    two = {"epsilon": 2.0, "budget_epsilon": 4.0, "rounds": [{"round": 1}],
           "events": [{"round": 5, "event": "spent_before_resume", "epsilon": 2.0, "before_resume": "first"},
                      {"round": 4, "event": "no_reply", "before_resume": "second"}]}
    assert unreported_round(two) == 4
    # an excluded reply's own claim covers nothing (its spend did not match the plan): the site is at its budget
    excluded = {"epsilon": 2.0, "budget_epsilon": 4.0, "rounds": [{"round": 1}],
                "events": [{"round": 2, "event": "no_reply"}, {"round": 3, "event": "excluded", "reported_epsilon": 0.5}]}
    assert unreported_round(excluded) == 3 and epsilon_bound(excluded) == 4.0


def test_a_site_whose_only_round_was_lost_after_its_release_passes_at_its_budget():
    """Its plain release rode on that round, so the audit counts it; the site's recorded epsilon is still 0."""
    from fedpggan.audit.spend import audit_spend

    site, _ = federated_site([1], [{"round": 1, "event": "no_reply", "reason": "timeout"}])
    site.rounds, site.epsilon, site.release = [], 0.0, (20.0, 1.0, 1)
    row, findings, notes = audit_spend(site)
    assert 0 < row["tightest_epsilon"] < site.budget_epsilon and findings == [], findings


def test_replace_one_covers_every_planned_step_when_an_event_explains_unrecorded_spend():
    from fedpggan.audit.spend import replace_one

    site, _ = federated_site([1, 2, 4], [])  # 3 of 4 rounds recorded, nothing else
    recorded = replace_one(site, [])
    assert recorded["replace_one_basis"] == "recorded rounds"
    assert recorded["replace_one_epsilon"] == accountants.replace_one_epsilon(site.history, site.delta)
    site, _ = federated_site([1, 2, 4], [{"round": 3, "event": "failed", "reason": "site error"}])
    bound = replace_one(site, [])  # round 3's spend is unrecorded: count all 8 planned steps
    assert bound["replace_one_basis"] == "planned steps (unrecorded spend)"
    assert bound["replace_one_epsilon"] == accountants.replace_one_epsilon(
        ((site.noise_multiplier, site.sample_rate, site.planned_steps),), site.delta) > recorded["replace_one_epsilon"]


def test_federated_site_that_trains_after_exhaustion_fails():
    site, facts = federated_site([1, 2], [{"round": 3, "event": "budget_exhausted", "reason": "..."}])
    assert check_rounds(site, facts)[0] == []  # rounds after it are not expected
    site, facts = federated_site([1, 2, 3, 4], [{"round": 3, "event": "budget_exhausted", "reason": "..."}])
    assert any("after declaring budget_exhausted" in f.reason for f in check_rounds(site, facts)[0])


def test_federated_steps_must_equal_local_steps():
    site, facts = federated_site([1, 2, 3, 4], [], steps=3)
    found = [f.field for f in check_mechanism(site, facts)]
    assert "sites.0.rounds[0].steps" in found and "sites.0.rounds" in found  # 12 steps > planned 8


# --- empirical audit ------------------------------------------------------------------------

def train_d_against_reference(noise_multiplier: float | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """D scores of (members, unseen records) after STEPS D steps with the product's trainer.

    A GAN whose generator matches the data forces D to tell its members from fresh samples of
    the same distribution, which it can only do by memorising them. A generator trained for
    seconds on a CPU is nowhere near that, so real *reference* records (disjoint from members
    and from the unseen ones) stand in for the converged generator's fakes."""
    torch.manual_seed(seed)
    n = MIA_MEMBERS
    data = open_phantom("train", n=6 * n, image_size=SIZE, seed=1)
    members, reference, unseen = data.subset(range(n)), data.subset(range(n, 2 * n)), data.subset(range(2 * n, 6 * n))
    gan = PGGAN(ModelShape(SIZE, 1, 2, latent_dim=8, g_width=4, d_width=16), GANConfig(lr_d=1e-3))

    def reference_fakes(k, prior=None):
        idx = torch.randint(0, n, (k,))
        return reference.images[idx], reference.labels[idx]

    gan.fake_batch = reference_fakes
    privacy = None if noise_multiplier is None else PrivacySettings(noise_multiplier, 1.0, MIA_DELTA, "rdp")
    with one_thread():
        DiscriminatorTrainer(gan, members.images, members.labels, MIA_BATCH, privacy).train(MIA_STEPS)
    return discriminator_scores(gan, members), discriminator_scores(gan, unseen)


def test_membership_inference_detects_an_overfit_discriminator_but_not_a_dp_one():
    sigma = 14.7  # epsilon 1 for these steps, checked here rather than calibrated (slow)
    epsilon = accountants.epsilon("rdp", ((sigma, sample_rate(MIA_MEMBERS, MIA_BATCH), MIA_STEPS),), MIA_DELTA)
    assert 0.9 < epsilon <= 1.0
    rng = np.random.default_rng(0)
    overfit = attack_metrics(*train_d_against_reference(None), MIA_DELTA, 50, rng)
    private = attack_metrics(*train_d_against_reference(sigma), MIA_DELTA, 50, rng)
    assert overfit["auc"] > 0.7 and overfit["auc_ci95"][0] > 0.6
    assert private["auc"] < 0.6


def test_distance_attack_detects_a_generator_that_copies_its_training_images():
    data = open_phantom("train", n=300, image_size=SIZE, seed=2)
    members, unseen = data.subset(range(100)), data.subset(range(100, 300))
    copies = (members.images + 0.01 * torch.randn_like(members.images)).flatten(1)
    rng = np.random.default_rng(0)
    leaky = attack_metrics(distance_scores(copies, members), distance_scores(copies, unseen), 1e-5, 0, rng)
    assert leaky["auc"] > 0.95 and leaky["epsilon_lower_bound"] > 1.0


def test_epsilon_lower_bound_is_zero_without_leakage_and_bounded_by_sample_size():
    rng = np.random.default_rng(0)
    same = epsilon_lower_bound(rng.normal(size=2000), rng.normal(size=2000), 1e-5, rng)
    assert same["epsilon_lower_bound"] < 0.3
    perfect = epsilon_lower_bound(np.full(1000, 5.0), np.zeros(1000), 1e-5, rng)["epsilon_lower_bound"]
    # 500 certifying non-members, none flagged: FPR <= ~0.0074 at 97.5%, so eps >= ~4.9 at most.
    assert 4.0 < perfect < math.log(500)


@pytest.mark.parametrize("k", [7, 40, 1000])
def test_members_and_non_members_are_drawn_with_the_same_class_mix(k):
    members, others = np.array([0] * 10 + [1] * 90 + [2] * 5), np.array([0] * 50 + [1] * 50)
    mine, theirs = class_matched(members, others, k, np.random.default_rng(0))
    assert len(mine) == len(theirs) == min(k, 60) and len(set(mine)) == len(mine) and len(set(theirs)) == len(theirs)
    assert np.array_equal(np.bincount(members[mine], minlength=3), np.bincount(others[theirs], minlength=3))
    assert np.bincount(members[mine], minlength=3)[2] == 0  # a class the held-out set lacks is left out


def test_mia_refuses_a_deployed_run_whose_members_stayed_at_the_sites(tmp_path):
    run = {"kind": "federated", "config": {"dataset": "auto", "image-size": 28}, "dataset": {"num_records": 9416}}
    with pytest.raises(FedPGGANError, match=r"^--mia: this run's sites \(hospital-a, hospital-b\) are deployed sites"):
        member_sets(RunFolder(tmp_path), run, ["hospital-a", "hospital-b"], None)


def test_cli_mia_on_the_dp_run(run_copy):
    with one_thread():
        code, report = audit(run_copy, "--mia", "--mia-records", "128", "--synthetic", "256", "--bootstraps", "20")
    assert code == 0, report["violations"]
    attacks = report["mia"]["sites"]["central"]
    assert set(attacks) == {"discriminator", "distance"}
    for m in attacks.values():
        assert m["members"] == 128 and m["non_members"] == 128
        assert 0.3 < m["auc"] < 0.7
        assert m["epsilon_lower_bound"] <= report["sites"]["central"]["tightest_epsilon"]
        assert m["confidence"] == report["mia"]["confidence_each"] == 1 - 0.05 / 2  # one site, two attacks: Bonferroni
    assert report["mia"]["holdout_left_out_as_training_images"] == 0
    assert "Membership inference" in (run_copy / "AUDIT.md").read_text()


def test_held_out_images_that_are_training_images_are_left_out():
    from fedpggan.audit.mia import without_training_images

    train, test = open_phantom("train", n=40), open_phantom("test", n=30)
    mixed = ImageDataset(torch.cat([test.images, train.images[:5]]), torch.cat([test.labels, train.labels[:5]]),
                         test.class_names, test.name, test.is_medical, test.source)
    kept, dropped = without_training_images(mixed, [train.subset(range(20)), train.subset(range(20, 40))])
    assert dropped == 5 and torch.equal(kept.images, test.images)
    with pytest.raises(FedPGGANError, match="every held-out image is also a training image"):
        without_training_images(train, [train])


def test_mia_on_a_run_whose_data_moved_says_to_put_it_back(run_copy, capsys):
    info = json.loads((run_copy / "run.json").read_text())
    info["config"]["dataset"] = str(run_copy / "moved.npz")
    (run_copy / "run.json").write_text(json.dumps(info))
    code, _ = audit(run_copy, "--mia")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not there any more; put it back" in err


def test_a_named_holdout_is_read_from_the_runs_data_folder_as_evaluate_reads_real(monkeypatch):
    from fedpggan.audit import mia_data

    opened = []
    monkeypatch.setattr(mia_data, "open_dataset", lambda spec, split, data_dir, *a, **k: opened.append((spec, split, data_dir)))
    run = {"config": {"dataset": "pneumoniamnist", "data-dir": "/site/data", "image-size": 28}}
    mia_data.non_members(run, None, "breastmnist")
    mia_data.non_members(run, "/given", "breastmnist")
    assert opened == [("breastmnist", "test", "/site/data"), ("breastmnist", "test", "/given")]


def test_a_run_json_older_than_noise_key_is_read_as_seeded_for_simulations_and_centralised_runs():
    """Before 2026-12-04 simulated and centralised runs drew their DP noise from --seed (in run.json); deployed
    sites drew it from their own secret keys. A simulation's folder holds partition.json, a deployed one's never."""
    from fedpggan.audit.runner import check_noise_key

    for kind, simulated, seeded in (("centralised", False, True), ("federated", True, True), ("federated", False, False)):
        notes: list[str] = []
        found = check_noise_key({"config": {}}, {"dp": True}, kind, notes, simulated)
        assert [f.field for f in found] == (["config.noise-key"] if seeded else []) and bool(notes) != seeded, (kind, simulated)
