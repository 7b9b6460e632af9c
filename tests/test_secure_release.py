"""The secure sum of the embedding releases: masks cancel only in the full sum, each site adds
1/sqrt(N) of the noise, and a share can never be sent in a way its noise does not cover."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from client.site import SiteState, check_collusion_cap
from client.site_round import ensure_mechanism, ensure_noise_key, ensure_release
from fedpggan.data import open_dataset
from fedpggan.errors import FedPGGANError
from fedpggan.privacy.feature_release import features_for
from fedpggan.privacy.mechanism import site_mechanism
from fedpggan.privacy.secure_sum import (FRACTION_BITS, check_key_list, epsilon_if_all_other_sites_collude, masked_share,
                                         new_key_pair,
                                         new_self_mask_seed, private_key_bytes, public_key_of, release_share_noise,
                                         seed_commitment, top_up_noise, unmasked_sum)
from pggan_model.mean_embedding import record_sum

from conftest import tiny_config


def shares_and_keys(n: int, shape=(11, 3)):
    gen = torch.Generator().manual_seed(0)
    shares = [100 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]
    keys = [new_key_pair() for _ in range(n)]
    seeds = [new_self_mask_seed() for _ in range(n)]
    publics = [public for _, public in keys]
    masked = [masked_share(s, private, public, publics, seed) for s, (private, public), seed in zip(shares, keys, seeds)]
    return shares, masked, seeds


def test_the_masks_cancel_in_the_sum_of_all_sites():
    shares, masked, seeds = shares_and_keys(4)
    total = unmasked_sum(masked, seeds, (11, 3))
    assert torch.allclose(total, sum(shares), atol=4 * 2.0**-FRACTION_BITS, rtol=0)


def test_one_masked_vector_a_partial_sum_or_the_sum_without_every_seed_reveals_nothing():
    shares, masked, seeds = shares_and_keys(4)
    alone = unmasked_sum(masked[:1], seeds[:1], (11, 3))  # even with its own seed: the pairwise masks stay
    partial = unmasked_sum(masked[:3], seeds[:3], (11, 3))
    unseeded = unmasked_sum(masked, seeds[:3], (11, 3))  # all vectors, one self-mask left on
    # uniform masks mod 2^64: the decoded values are of the order 2^63 / 2^24, not of the shares' ~100
    for view in (alone, partial, unseeded):
        assert view.abs().median() > 1e9
    assert not torch.allclose(partial, sum(shares[:3]), atol=1.0)


def test_a_key_list_without_this_site_or_with_a_repeated_key_is_refused():
    (private, public), (_, other) = new_key_pair(), new_key_pair()
    with pytest.raises(FedPGGANError, match="key list"):
        masked_share(torch.zeros(2), private, public, [other], new_self_mask_seed())
    with pytest.raises(FedPGGANError, match="key list"):
        masked_share(torch.zeros(2), private, public, [public, other, other], new_self_mask_seed())
    # a low-order point (all zeros) agrees a zero secret with everyone: refused before any share is drawn
    with pytest.raises(FedPGGANError, match=r"key 2 of the server's key list is not a usable X25519 public key .*no share was drawn"):
        check_key_list(public, [public, bytes(32), other])


def test_sites_of_different_sizes_need_one_delta_for_a_secure_release(tmp_path):
    """Each share carries 1/sqrt(N) of its own site's noise: the sum is as noisy as one release only if
    every site's noise is the same. With --delta 0 a site of more than 10 000 images would get a
    smaller delta, hence more noise, than the others, and the sum less than its release needs."""
    secure = tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure")
    site_mechanism(secure, 5000, 100)  # delta 1e-5, as every site of <= 10 000 images
    with pytest.raises(FedPGGANError, match=r"one delta at every site.*20000 images.*set --delta") as excinfo:
        site_mechanism(secure, 20000, 100)
    assert "\n" not in str(excinfo.value)
    site_mechanism(tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure", delta=4e-6), 20000, 100)
    site_mechanism(tiny_config(tmp_path, epsilon=1.0), 20000, 100)  # plain: each release carries its own full noise


def site_state(tmp_path: Path, cfg, data) -> SiteState:
    state = SiteState.load(tmp_path, "run")
    ensure_noise_key(state, cfg, 0)
    ensure_mechanism(state, cfg, len(data))
    return state


@pytest.fixture
def phantom():
    return open_dataset("phantom", "train", None)


def test_a_share_carries_one_over_sqrt_n_of_the_release_noise(tmp_path, phantom):
    cfg = tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure")
    state = site_state(tmp_path, cfg, phantom)
    share = ensure_release(state, cfg, phantom, share_of=4)
    features = features_for(phantom.image_shape, cfg.embedding_frequencies, cfg.seed, cfg.embedding_blur)
    exact = record_sum(features, phantom.images, phantom.labels, phantom.num_classes, cfg.embedding_count_share)
    noise = (share.double() - exact.double()).flatten()
    expected = release_share_noise(state.release_noise, 4)
    assert expected == pytest.approx(state.release_noise / 2)
    assert float(noise.std()) == pytest.approx(expected, rel=0.1)  # 2 x 1001 draws
    assert state.history[0] == [state.release_noise, 1.0, 1]  # the accountant charges the whole release
    assert state.release_share_of == 4


def test_a_share_is_never_sent_with_less_noise_than_its_sum_needs(tmp_path, phantom):
    cfg = tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure")
    state = site_state(tmp_path, cfg, phantom)
    share = ensure_release(state, cfg, phantom, share_of=4)
    with pytest.raises(FedPGGANError, match="cannot be sent plain"):
        ensure_release(state, cfg, phantom)
    assert torch.equal(ensure_release(state, cfg, phantom, share_of=5), share)  # more noise in the sum: allowed
    for fewer in (3, 2):  # the sum restarted without a failed site: the share is topped up, the same way each time
        topped = ensure_release(state, cfg, phantom, share_of=fewer)
        assert torch.equal(ensure_release(state, cfg, phantom, share_of=fewer), topped)
        added = float((topped.double() - share.double()).std())
        assert added == pytest.approx(top_up_noise(state.release_noise, 4, fewer), rel=0.1)
        # the share's noise variances add up to sigma^2 / fewer: the sum of `fewer` shares carries sigma^2
        assert top_up_noise(state.release_noise, 4, fewer) ** 2 + release_share_noise(state.release_noise, 4) ** 2 == \
            pytest.approx(release_share_noise(state.release_noise, fewer) ** 2)
    assert state.release_share_of == 4  # the share on disk stays the one made for the first key list


def worst_case(state: SiteState, num_sites: int) -> float:
    dp_sgd = (state.noise_multiplier, state.sample_rate, state.planned_steps)
    return epsilon_if_all_other_sites_collude(state.release_noise, num_sites, dp_sgd, state.delta, state.accountant)


def test_a_site_caps_what_a_colluding_or_key_forging_server_could_learn(tmp_path, phantom):
    cfg = tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure")
    state = site_state(tmp_path, cfg, phantom)
    worst = worst_case(state, 4)
    assert 1.0 < worst < worst_case(state, 400)  # a share alone is worth more than the run's epsilon; more keys, more
    check_collusion_cap({"max-epsilon": 1.0, "max-epsilon-if-colluding": 1.01 * worst}, state, 4)
    with pytest.raises(FedPGGANError, match=r"over 400 sites .* max-epsilon-if-colluding"):  # a forged key list
        check_collusion_cap({"max-epsilon": 1.0, "max-epsilon-if-colluding": 1.01 * worst}, state, 400)
    with pytest.raises(FedPGGANError, match="above its max-epsilon-if-colluding 1:"):  # default: the site's max-epsilon
        check_collusion_cap({"max-epsilon": 1.0}, state, 4)
    check_collusion_cap({}, state, 400)  # no cap at all (max-epsilon "none", as in a simulation)


def test_a_site_over_its_cap_draws_no_share_and_charges_nothing(tmp_path):
    from types import SimpleNamespace

    from client.client_app import release_masked

    cfg = tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure")
    node_config = {"partition-id": 0, "num-partitions": 3, "max-epsilon": 1.0}
    raw = {**cfg.to_flower(), "run-id": "run", "site-state-root": str(tmp_path / "sites")}
    state = SiteState.load(tmp_path / "sites" / "site_0", "run")
    private, public = new_key_pair()
    state.path.parent.mkdir(parents=True)
    state.secure_key_file.write_bytes(private_key_bytes(private))  # step 1 done
    msg = SimpleNamespace(content={"config": raw, "keys": {"public-keys": [public, new_key_pair()[1], new_key_pair()[1]]}})
    with pytest.raises(FedPGGANError, match="max-epsilon-if-colluding 1:"):
        release_masked(msg, SimpleNamespace(node_config=node_config))
    state = SiteState.load(tmp_path / "sites" / "site_0", "run")
    assert not state.release_file.exists() and state.history == [] and state.release_share_of == 0
    other = new_key_pair()[1]
    repeated = SimpleNamespace(content={"config": raw, "keys": {"public-keys": [public, other, other]}})
    with pytest.raises(FedPGGANError, match="key list must hold this site's public key once"):
        release_masked(repeated, SimpleNamespace(node_config={**node_config, "max-epsilon-if-colluding": 1e9}))
    state = SiteState.load(tmp_path / "sites" / "site_0", "run")
    assert not state.release_file.exists() and state.history == [] and state.release_share_of == 0  # nothing charged


def test_a_crash_between_charging_and_drawing_cannot_lower_the_noise(tmp_path, phantom):
    cfg = tiny_config(tmp_path, epsilon=1.0, release_aggregation="secure")
    state = site_state(tmp_path, cfg, phantom)
    share = ensure_release(state, cfg, phantom, share_of=4)
    topped = ensure_release(state, cfg, phantom, share_of=2)
    state.release_file.unlink()  # as if the site died before writing its share
    assert torch.equal(ensure_release(state, cfg, phantom, share_of=2), topped)  # redrawn for 4 sites, then topped up
    state.release_file.unlink()
    assert torch.equal(ensure_release(state, cfg, phantom, share_of=5), share)  # not redrawn with less noise for 5


def test_a_release_made_without_dp_is_counted_by_the_lifetime_caps(tmp_path, phantom):
    """A run without DP whose only contact is its (secure) release has read the data: the site's
    lifetime caps must count it as (inf, 1), as they count a round trained without DP."""
    cfg = tiny_config(tmp_path, release_aggregation="secure")  # epsilon inf: no DP
    state = site_state(tmp_path, cfg, phantom)
    assert not cfg.dp and not state.trained_without_dp
    ensure_release(state, cfg, phantom, share_of=3)
    assert SiteState.load(tmp_path, "run").trained_without_dp  # saved before the data were read


def test_the_centralised_trainer_refuses_a_secure_release(tmp_path):
    from fedpggan.train import train_centralised

    with pytest.raises(FedPGGANError, match="release-aggregation secure"):
        train_centralised(tiny_config(tmp_path / "run", epsilon=1.0, release_aggregation="secure"))


def test_fixed_point_encoding_refuses_values_it_cannot_hold():
    (private, public) = new_key_pair()
    with pytest.raises(ValueError, match="too large"):
        masked_share(torch.tensor([2.0**40]), private, public, [public], new_self_mask_seed())
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match="not finite numbers"):
            masked_share(torch.tensor([value]), private, public, [public], new_self_mask_seed())
    seed = new_self_mask_seed()
    assert math.isclose(float(unmasked_sum([masked_share(torch.tensor([-3.25]), private, public, [public], seed)], [seed], (1,))),
                        -3.25)


class ProtocolSites:
    """Sites that answer the secure release with real keys and masks, as Flower's Grid would
    deliver them. ``fail``: (step, attempt, or for "reveal" the how-many-th request) -> (site, error
    or None for silence). ``wrong_seed``: a site that reveals another seed than its vector's;
    ``short``: a site that sends a vector of the wrong length."""

    def __init__(self, shares: dict[int, torch.Tensor], fail: dict[tuple[str, int], tuple[int, str | None]]):
        self.shares, self.fail, self.attempt, self.reveal_calls, self.wrong_seed, self.short = shares, fail, 0, 0, None, None
        self.private, self.seeds, self.lists, self.made_for, self.revealed = {}, {}, [], {}, {}
        self.forged, self.copies = {}, {}  # node -> the raw key it sends; node -> the node whose key it copies
        self.no_commitment, self.str_signer = None, None  # a site that sends no seed hash; one whose signer is a str

    def reply(self, node, content=None, error=None):
        from types import SimpleNamespace

        # the SuperLink answers itself, as node 1, for a node it lost (offline, or the message's time to live ran out)
        source = 1 if error is not None and error.startswith("superlink:") else node
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=source, reply_to_message_id=f"m{node}"),
                               has_error=lambda: error is not None, error=SimpleNamespace(reason=error), content=content)

    def answer(self, step: str, node: int, content):
        from types import SimpleNamespace

        from fedpggan.wire import key_reply, masked_reply, public_keys_of, reveal_reply

        if step == "keys":
            self.private[node], public = new_key_pair()
            if node in self.copies:  # a hostile or broken site sends another site's key
                public = public_key_of(self.private[self.copies[node]])
            signed = SimpleNamespace(signer="oops", signature=b"x") if node == self.str_signer else None
            return key_reply(self.forged.get(node, public), signed)
        if step == "masked":
            publics = public_keys_of(content["keys"])
            self.lists.append(len(publics))
            private, self.seeds[node] = self.private[node], new_self_mask_seed()
            share = self.shares[node].flatten()[:3] if node == self.short else self.shares[node]
            masked = masked_share(share, private, public_key_of(private), publics, self.seeds[node])
            commitment = b"" if node == self.no_commitment else seed_commitment(self.seeds[node])
            return masked_reply(masked, [], self.made_for.setdefault(node, len(publics)), commitment)
        assert self.revealed.setdefault(node, self.attempt) == self.attempt, "a site reveals for one attempt only"
        return reveal_reply(new_self_mask_seed() if node == self.wrong_seed else self.seeds[node])

    def send_and_receive(self, messages, timeout):
        step = messages[0][1].removeprefix("query.release_")
        self.attempt += step == "keys"
        self.reveal_calls += step == "reveal"
        failing, error = self.fail.get((step, self.reveal_calls if step == "reveal" else self.attempt), (None, None))
        replies = []
        for node, _, content in messages:
            if node != failing:
                replies.append(self.reply(node, self.answer(step, node, content)))
            elif error is not None:
                replies.append(self.reply(node, error=error))
        return replies


def run_protocol(monkeypatch, sites: ProtocolSites, needed: int = 2):
    from types import SimpleNamespace

    from flwr.app import ConfigRecord

    import server.secure_release
    from server.secure_release import secure_sum

    class Sent(tuple):  # outside a Flower run a Message cannot be built: the fake grid reads (node, type, content)
        def __new__(cls, content, dst_node_id, message_type, **_):
            sent = super().__new__(cls, (dst_node_id, message_type, content))
            sent.metadata = SimpleNamespace(dst_node_id=dst_node_id, message_id=f"m{dst_node_id}")  # as a grid's push sets it
            return sent

    monkeypatch.setattr(server.secure_release, "Message", Sent)
    nodes = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c", 14: "hospital-d"}
    return secure_sum(sites, nodes, ConfigRecord({}), (5, 2), needed, 30)


def test_sites_that_fail_the_secure_release_are_left_out_and_the_rest_sum_again(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    shares = {n: torch.randn(5, 2, generator=gen, dtype=torch.float64) for n in (11, 12, 13, 14)}
    flower_wrapped = "<class 'fedpggan.errors.FedPGGANError'>:<'" + "cap exceeded: raise it. " * 20 + "'>"
    sites = ProtocolSites(shares, {("keys", 1): (14, None), ("masked", 1): (12, flower_wrapped)})
    result = run_protocol(monkeypatch, sites)
    assert result.sites == ["hospital-a", "hospital-c"] and result.made_for == {"hospital-a": 3, "hospital-c": 3}
    assert sites.lists == [3, 3, 2, 2]  # attempt 1 over a, b, c; attempt 2, fresh keys, over a and c
    assert sites.revealed == {11: 2, 13: 2}  # seeds only for the attempt whose vectors were all in
    assert result.left_out == {"hospital-d": "no answer within --round-timeout 30s",
                               "hospital-b": ("cap exceeded: raise it. " * 20)[:300]}  # the site's words, not Flower's wrapper
    assert torch.allclose(result.pooled, shares[11] + shares[13], atol=2 * 2.0**-FRACTION_BITS, rtol=0)
    assert set(run_protocol(monkeypatch, ProtocolSites(shares, {})).sites) == {f"hospital-{c}" for c in "abcd"}


def test_a_site_the_superlink_lost_is_left_out_by_the_reply_it_answers_not_its_source(monkeypatch):
    shares = {n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    sites = ProtocolSites(shares, {("masked", 1): (12, "superlink: the node is unavailable")})
    result = run_protocol(monkeypatch, sites)
    assert result.left_out == {"hospital-b": "superlink: the node is unavailable"}
    assert result.sites == ["hospital-a", "hospital-c", "hospital-d"]


def test_a_site_misstating_the_sum_its_share_was_made_for_is_left_out_before_anyone_reveals(monkeypatch):
    """The ledger's worst case for a site rests on the N its share was made for: the server's own record of the
    first key list it sent, never the site's word (10 000 would also stop the accountant after every reveal)."""
    shares = {n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    sites = ProtocolSites(shares, {})
    sites.made_for[12] = 10_000
    result = run_protocol(monkeypatch, sites)
    assert result.left_out == {"hospital-b": "says its share was made for 10000 sites, but the first key list it was "
                                             "sent had 4: its noise would be misstated"}
    assert result.made_for == {"hospital-a": 4, "hospital-c": 4, "hospital-d": 4} and sites.revealed == {11: 2, 13: 2, 14: 2}


def test_a_site_with_a_malformed_vector_is_left_out_not_the_run_stopped(monkeypatch):
    shares = {n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    sites = ProtocolSites(shares, {})
    sites.short = 12
    result = run_protocol(monkeypatch, sites)
    assert result.left_out == {"hospital-b": "sent a malformed reply (a vector of 3 entries, not 10): it must run the "
                                             "coordinator's fedpggan version"}
    assert torch.allclose(result.pooled, torch.full((5, 2), 3.0, dtype=torch.float64))


def test_a_vector_without_its_seed_hash_is_left_out_before_any_site_reveals(monkeypatch):
    """Without the hash no seed could pass the reveal: accepted, it would make every site spend its one reveal
    on a sum that then stays masked."""
    shares = {n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    sites = ProtocolSites(shares, {})
    sites.no_commitment = 13
    result = run_protocol(monkeypatch, sites)
    assert "no hash of its self-mask seed" in result.left_out["hospital-c"] and sites.lists == [4, 4, 4, 4, 3, 3, 3]
    assert sites.revealed == {11: 2, 12: 2, 14: 2}  # only the second attempt's sites revealed, once
    assert torch.allclose(result.pooled, torch.full((5, 2), 3.0, dtype=torch.float64))


def test_a_key_reply_with_a_signer_that_is_not_bytes_leaves_that_site_out_not_the_run_stopped(monkeypatch):
    shares = {n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    sites = ProtocolSites(shares, {})
    sites.str_signer = 12
    result = run_protocol(monkeypatch, sites)
    assert "a signer that is not bytes" in result.left_out["hospital-b"] and sites.lists == [3, 3, 3]
    assert result.sites == ["hospital-a", "hospital-c", "hospital-d"]


def test_sites_sending_an_unusable_or_a_copied_key_are_left_out_at_the_key_step(monkeypatch):
    """Caught before any site draws its share: a low-order key, or one key sent by two sites, would
    otherwise make every honest site refuse the list after charging its release."""
    shares = {n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    sites = ProtocolSites(shares, {})
    sites.forged, sites.copies = {12: bytes(32)}, {14: 13}
    result = run_protocol(monkeypatch, sites, needed=1)
    assert result.sites == ["hospital-a"] and sites.lists == [1]
    assert "low-order point" in result.left_out["hospital-b"]
    assert result.left_out["hospital-c"] == result.left_out["hospital-d"] == "sent the same public key as another site (a copied key)"


def test_a_secure_release_with_too_few_sites_left_stops_naming_them(monkeypatch):
    shares = {n: torch.zeros(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    sites = ProtocolSites(shares, {("masked", 1): (12, "disk full"), ("masked", 2): (13, "out of memory")})
    with pytest.raises(FedPGGANError, match=r"2 site\(s\) left, fewer than the 3 it needs .*site hospital-b: disk full; "
                                            r"site hospital-c: out of memory; fix those sites.*nothing was revealed") as stopped:
        run_protocol(monkeypatch, sites, needed=3)
    assert sites.attempt == 2  # it gave up before a third attempt, which could not reach 3 sites
    # what the ledger's worst cases rest on: the first key list each site was sent (a share made for 4)
    assert stopped.value.made_for == {f"hospital-{c}": 4 for c in "abcd"}


def test_a_grid_error_mid_protocol_stops_it_saying_what_each_share_was_made_for(monkeypatch):
    """The ledger's worst case for each site rests on ``made_for``: an error of Flower's own (not a site's) must carry it too."""
    from server.secure_release import SecureSumFailed

    class LinkDown(ProtocolSites):
        def send_and_receive(self, messages, timeout):
            if messages[0][1] == "query.release_masked":
                raise RuntimeError("the SuperLink went away")
            return super().send_and_receive(messages, timeout)

    with pytest.raises(SecureSumFailed, match="^secure release: RuntimeError: the SuperLink went away$") as stopped:
        run_protocol(monkeypatch, LinkDown({n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}, {}))
    assert stopped.value.made_for == {f"hospital-{c}": 4 for c in "abcd"}


def test_a_reveal_is_retried_and_one_that_keeps_failing_stops_the_secure_release_with_the_sum_still_masked(monkeypatch):
    shares = {n: torch.ones(5, 2, dtype=torch.float64) for n in (11, 12, 13, 14)}
    flaky = ProtocolSites(shares, {("reveal", 1): (13, "disk full")})
    assert torch.allclose(run_protocol(monkeypatch, flaky).pooled, torch.full((5, 2), 4.0, dtype=torch.float64))
    assert flaky.reveal_calls == 2  # the second request went to hospital-c alone
    failing = ProtocolSites(shares, {("reveal", k): (13, "disk full") for k in (1, 2, 3)})
    with pytest.raises(FedPGGANError, match=r"site hospital-c did not reveal its self-mask \(disk full\) after 3 tries: "
                                            r"the sum stays masked to this server \(unless a site that did not reveal"):
        run_protocol(monkeypatch, failing)
    assert failing.attempt == 1  # no restart: the sites that revealed could not take part again
    lying = ProtocolSites(shares, {})
    lying.wrong_seed = 12
    with pytest.raises(FedPGGANError, match="site hospital-b did not reveal its self-mask .revealed a self-mask seed that "
                                            "does not match the hash sent with its vector"):
        run_protocol(monkeypatch, lying)


def test_a_site_error_is_the_sites_own_words_also_inside_a_simulations_traceback():
    from types import SimpleNamespace

    from fedpggan.wire import site_error

    def reply(reason):
        return SimpleNamespace(error=SimpleNamespace(reason=reason))

    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
           "  File \"client/site.py\", line 179, in load\n    data = json.loads(path.read_text())\n"
           "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n\n"
           "The above exception was the direct cause of the following exception:\n\n"
           "fedpggan.errors.FedPGGANError: state.json is corrupt; restore it from backup\n"
           "flwr.clientapp.client_app.ClientAppException: \n"
           "Exception ClientAppException occurred. Message: state.json is corrupt; restore it from backup'>")
    assert site_error(reply(ray)) == "state.json is corrupt; restore it from backup"
    assert site_error(reply(ray.replace("Exception ClientAppException occurred. Message", "Other"))) == \
        "state.json is corrupt; restore it from backup"  # the outermost error, not its cause
    assert site_error(reply("<class 'fedpggan.errors.FedPGGANError'>:<'cap exceeded'>")) == "cap exceeded"
    assert site_error(reply("timed out")) == "timed out"

