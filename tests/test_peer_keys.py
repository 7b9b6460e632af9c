"""Signed key lists for the secure release: a site masks its share only towards keys that distinct
peers of its roster signed for this run, so a server that forges or swaps keys gets no share; and
it reveals its self-mask for one attempt only, so a server that restarts the sum gets one sum."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import client.client_app
from client.client_app import release_keys, release_masked, release_reveal
from client.site import SiteState, peer_signing
from fedpggan.errors import FedPGGANError
from fedpggan.privacy.peer_keys import load_peer_signing, load_roster, sign_key, verify_key_list
from fedpggan.privacy.secure_sum import FRACTION_BITS, new_key_pair, unmasked_sum
from fedpggan.wire import key_list_record, masked_vector, revealed_seed, verified_signers

from conftest import tiny_config, write_ssh_key

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture
def consortium(tmp_path):
    """Three sites' SuperNode keys and the roster the coordinator hands out (cat *.pub > peers.pub)."""
    keys = {name: write_ssh_key(tmp_path / f"{name}.key") for name in SITES}
    lines = [f"{(tmp_path / f'{name}.pub').read_text().strip()} {name}" for name in SITES]
    (tmp_path / "peers.pub").write_text("# the consortium, fingerprints confirmed by phone\n\n" + "\n".join(lines) + "\n")
    return SimpleNamespace(keys=keys, roster=load_roster(tmp_path / "peers.pub"), path=tmp_path)


def signed_list(consortium, run_id="run-1"):
    return [sign_key(consortium.keys[name], run_id, new_key_pair()[1]) for name in SITES]


def test_a_list_every_peer_signed_for_this_run_is_accepted(consortium):
    assert verify_key_list(signed_list(consortium), consortium.roster, "run-1") == list(SITES)


def test_a_key_the_server_swapped_in_is_refused(consortium):
    entries = signed_list(consortium)
    entries[1] = replace(entries[1], public_key=new_key_pair()[1])  # the server's own key under b's signature
    with pytest.raises(FedPGGANError, match="'hospital-b' does not carry 'hospital-b''s signature"):
        verify_key_list(entries, consortium.roster, "run-1")


def test_a_key_signed_by_an_outsider_or_not_at_all_is_refused(consortium):
    entries = signed_list(consortium)
    outsider = sign_key(ec.generate_private_key(ec.SECP384R1()), "run-1", new_key_pair()[1])
    with pytest.raises(FedPGGANError, match="key 3 of the server's key list is not signed by a key in this site's peer-keys"):
        verify_key_list([*entries[:2], outsider], consortium.roster, "run-1")
    unsigned = replace(entries[0], signer=b"", signature=b"")
    with pytest.raises(FedPGGANError, match="key 1 .* not signed"):
        verify_key_list([unsigned, *entries[1:]], consortium.roster, "run-1")


def test_two_keys_of_one_signer_or_a_key_of_another_run_are_refused(consortium):
    entries = signed_list(consortium)
    second = sign_key(consortium.keys["hospital-a"], "run-1", new_key_pair()[1])  # a sybil: one peer, two keys
    with pytest.raises(FedPGGANError, match="two keys signed by 'hospital-a'"):
        verify_key_list([*entries, second], consortium.roster, "run-1")
    with pytest.raises(FedPGGANError, match="does not carry 'hospital-a''s signature for this run"):
        verify_key_list(entries, consortium.roster, "run-2")


def test_a_roster_error_names_the_file_the_line_and_the_fix(consortium, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text(f"{(consortium.path / 'hospital-a.pub').read_text().strip()} a\nssh-rsa AAAAnot-a-key b\n")
    with pytest.raises(FedPGGANError, match=r"privacy.peer-keys .*bad.pub, line 2: not an OpenSSH public key"):
        load_roster(bad)
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH).decode()
    bad.write_text(ed + " c\n")
    with pytest.raises(FedPGGANError, match="line 1: not a NIST-curve ECDSA key"):
        load_roster(bad)
    line = (consortium.path / "hospital-a.pub").read_text().strip()
    bad.write_text(f"{line} a\n{line} again\n")
    with pytest.raises(FedPGGANError, match="line 2: the key of 'again' is listed twice"):
        load_roster(bad)
    bad.write_text("# nobody\n")
    with pytest.raises(FedPGGANError, match="holds no public key"):
        load_roster(bad)
    with pytest.raises(FedPGGANError, match="cannot read .*peers.pub and set privacy.peer-keys"):
        load_roster(tmp_path / "missing.pub")
    bad.write_bytes(b"0\x82\x01\xff")  # a DER key or the private key named by mistake: one line, no traceback
    with pytest.raises(FedPGGANError, match="bad.pub: cannot read .not a text file of OpenSSH public keys."):
        load_roster(bad)


def test_a_site_missing_from_its_own_roster_or_without_its_key_is_told_how_to_fix_it(consortium):
    outsider = consortium.path / "outsider.key"
    write_ssh_key(outsider)
    with pytest.raises(FedPGGANError, match="does not list this site's own key"):
        load_peer_signing(consortium.path / "peers.pub", outsider)
    with pytest.raises(FedPGGANError, match="no 'auth-private-key'"):
        peer_signing({"peer-keys": str(consortium.path / "peers.pub")})
    assert peer_signing({}) is None  # a simulated site, or one that takes the list on trust
    assert load_peer_signing(consortium.path / "peers.pub", consortium.path / "hospital-b.key").own_name == "hospital-b"


# --- the two ClientApp steps, in process, as the server drives them ----------------------------------------------
def node_config(consortium, index: int) -> dict:
    name = SITES[index]
    return {"partition-id": index, "num-partitions": 3, "peer-keys": str(consortium.path / "peers.pub"),
            "auth-private-key": str(consortium.path / f"{name}.key")}


def step_one(consortium, raw):
    """Every site's signed key, relayed as the server relays it (fedpggan server: secure_release)."""
    replies = [release_keys(SimpleNamespace(content={"config": raw}), SimpleNamespace(node_config=node_config(consortium, i)))
               for i in range(3)]
    return dict(key_list_record(replies))


@pytest.fixture
def secure_run(tmp_path, monkeypatch):
    # outside a Flower run a Message cannot be built: the handlers' replies are their RecordDicts
    monkeypatch.setattr(client.client_app, "Message", lambda content, reply_to: content)
    cfg = tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure")
    return {**cfg.to_flower(), "run-id": "run-1", "site-state-root": str(tmp_path / "sites")}


def step_two(consortium, raw, key_list, sites=range(3)):
    return [release_masked(SimpleNamespace(content={"config": raw, "keys": key_list}),
                           SimpleNamespace(node_config=node_config(consortium, i))) for i in sites]


def step_three(consortium, raw, key_list, sites=range(3)):
    return [revealed_seed(release_reveal(SimpleNamespace(content={"config": raw, "keys": key_list}),
                                         SimpleNamespace(node_config=node_config(consortium, i)))) for i in sites]


def test_sites_with_a_roster_sign_check_and_mask_and_the_masks_cancel(consortium, secure_run):
    key_list = step_one(consortium, secure_run)
    assert all(key_list["signatures"])
    replies, shares = step_two(consortium, secure_run, key_list), []
    for i, reply in enumerate(replies):
        assert verified_signers(reply) == sorted(SITES)
        state = SiteState.load(Path(secure_run["site-state-root"]) / f"site_{i}", "run-1")
        assert state.release_signers == list(SITES) and not state.secure_key_file.exists()
        shares.append(torch.load(state.release_file, weights_only=True).double())
    vectors = [masked_vector(reply) for reply in replies]
    seeds = step_three(consortium, secure_run, key_list)
    total = unmasked_sum(vectors, seeds, tuple(shares[0].shape))
    assert torch.allclose(total, sum(shares), atol=4 * 2.0**-FRACTION_BITS, rtol=0)
    assert step_three(consortium, secure_run, key_list) == seeds  # a repeated request gets the same seeds, nothing new


def test_a_site_reveals_its_self_mask_for_one_attempt_only(consortium, secure_run):
    """A server that collected every vector, claimed a failure and restarted without a site would
    hold two sums over different sites; their difference would isolate that site's share. Only one
    of them can lose its self-masks."""
    first = step_one(consortium, secure_run)
    vectors = [masked_vector(reply) for reply in step_two(consortium, secure_run, first)]
    seeds = step_three(consortium, secure_run, first, sites=[0, 1])  # site 2's seed is held back
    assert unmasked_sum(vectors, seeds, (1001, 2)).abs().median() > 1e9  # attempt 1 stays masked
    second = step_one(consortium, secure_run)
    second = {name: values[:2] for name, values in second.items()}  # "site 2 failed"
    with pytest.raises(FedPGGANError, match="already revealed its self-mask for another attempt"):
        step_two(consortium, secure_run, second, sites=[0])
    with pytest.raises(FedPGGANError, match="attempt this site sent no vector in"):  # site 2 sent none for the second list
        step_three(consortium, secure_run, second, sites=[2])
    state = SiteState.load(Path(secure_run["site-state-root"]) / "site_0", "run-1")
    assert state.revealed_file.read_bytes() == bytes(first["public-keys"][0])


def test_a_site_reveals_the_seed_of_its_latest_vector_only(consortium, secure_run):
    first = step_one(consortium, secure_run)
    step_two(consortium, secure_run, first)  # every vector sent, no seed revealed: "a site failed"
    second = step_one(consortium, secure_run)
    step_two(consortium, secure_run, second)
    with pytest.raises(FedPGGANError, match="attempt this site sent no vector in"):  # the first attempt's seed is gone
        step_three(consortium, secure_run, first, sites=[0])
    assert len(step_three(consortium, secure_run, second)) == 3


def test_a_forged_key_list_draws_no_share_and_charges_nothing(consortium, secure_run):
    key_list = step_one(consortium, secure_run)
    forged = {**key_list, "public-keys": [key_list["public-keys"][0], new_key_pair()[1], key_list["public-keys"][2]]}
    with pytest.raises(FedPGGANError, match="'hospital-b' does not carry 'hospital-b''s signature"):
        release_masked(SimpleNamespace(content={"config": secure_run, "keys": forged}),
                       SimpleNamespace(node_config=node_config(consortium, 0)))
    unsigned = {"public-keys": key_list["public-keys"]}  # a coordinator that predates signed keys
    with pytest.raises(FedPGGANError, match="carries no signatures"):
        release_masked(SimpleNamespace(content={"config": secure_run, "keys": unsigned}),
                       SimpleNamespace(node_config=node_config(consortium, 0)))
    state = SiteState.load(Path(secure_run["site-state-root"]) / "site_0", "run-1")
    assert state.history == [] and not state.release_file.exists() and state.secure_key_file.exists()


def test_a_site_without_a_roster_signs_nothing_and_its_peers_refuse_the_list(consortium, secure_run):
    plain = {"partition-id": 1, "num-partitions": 3}
    reply = release_keys(SimpleNamespace(content={"config": secure_run}), SimpleNamespace(node_config=plain))
    assert set(reply["key"]) == {"public-key"}
    key_list = step_one(consortium, secure_run)
    key_list = {name: [values[0], b"" if name != "public-keys" else bytes(reply["key"]["public-key"]), values[2]]
                for name, values in key_list.items()}
    with pytest.raises(FedPGGANError, match="key 2 of the server's key list is not signed"):
        release_masked(SimpleNamespace(content={"config": secure_run, "keys": key_list}),
                       SimpleNamespace(node_config=node_config(consortium, 0)))
