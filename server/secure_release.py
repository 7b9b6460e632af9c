"""The server's side of the secure release (fedpggan.privacy.secure_sum): ask each site for a
one-run key, relay the key list, add up the masked vectors, and once all are in, ask for the
self-mask seeds. A site that fails the first or second step is left out and the others start
again with fresh keys, each topping its share up for the smaller sum, until every site of an
attempt has sent its vector or too few are left. A reveal that still fails after retries stops
the protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpggan.errors import FedPGGANError
from fedpggan.privacy.secure_sum import seed_commitment, unmasked_sum
from fedpggan.wire import (key_list_record, masked_vector, revealed_seed, seed_commitment_of, share_made_for, site_error,
                           verified_signers)

REVEAL_TRIES = 3  # asking a site again for the same seed is safe: a failed reveal is retried


@dataclass
class SecureSum:
    pooled: torch.Tensor  # the sum of the shares of ``sites``: all the server learns
    sites: list[str]  # whose shares make the sum
    made_for: dict[str, int]  # site -> N its share was first made for: its least noisy share has sigma / sqrt(N)
    left_out: dict[str, str]  # site -> why its share is not in the sum
    signers: dict[str, list[str]]  # site -> the peers whose signed keys it checked ([]: none)


def secure_sum(grid: Grid, nodes: dict[int, str], config: ConfigRecord, shape: tuple[int, ...], needed: int,
               timeout: float, left_out: dict[str, str]) -> SecureSum:
    """Run the protocol with ``nodes`` (node id -> site id); ``left_out`` starts with the sites
    that are not there at all. Nothing is unmasked unless every site of an attempt answered."""
    while True:
        enough(nodes, needed, left_out)
        keys = ask(grid, nodes, "query.release_keys", RecordDict({"config": config}), "key", left_out, timeout)
        nodes = {n: s for n, s in nodes.items() if n in keys}
        enough(nodes, needed, left_out)
        order = sorted(nodes)
        content = RecordDict({"config": config, "keys": key_list_record([keys[n] for n in order])})
        replies = ask(grid, nodes, "query.release_masked", content, "masked", left_out, timeout, size=math.prod(shape))
        if len(replies) == len(order):
            break
        # This attempt's vectors hold masks towards the failed sites: start again without them.
        nodes = {n: s for n, s in nodes.items() if n in replies}
    seeds = reveal(grid, nodes, content, {n: seed_commitment_of(replies[n]) for n in order}, timeout)
    pooled = unmasked_sum([masked_vector(replies[n]) for n in order], [seeds[n] for n in order], shape)
    # A site's own word for the list its share was first made for covers a server that crashed
    # mid-protocol and restarted it; the sum's own size is the floor.
    made_for = {nodes[n]: max(share_made_for(replies[n]), len(order)) for n in order}
    return SecureSum(pooled, sorted(nodes.values()), made_for, left_out, {nodes[n]: verified_signers(replies[n]) for n in order})


def reveal(grid: Grid, nodes: dict[int, str], content: RecordDict, commitments: dict[int, bytes],
           timeout: float) -> dict[int, bytes]:
    """Every site's self-mask seed for this attempt, checked against the hash it sent with its
    vector. A site re-sends the same seed when asked again, so a failed reveal is retried."""
    seeds: dict[int, bytes] = {}
    for _ in range(REVEAL_TRIES):
        failed: dict[str, str] = {}
        answers = ask(grid, {n: s for n, s in nodes.items() if n not in seeds}, "query.release_reveal", content, "reveal",
                      failed, timeout)
        for node, answer in answers.items():
            if seed_commitment(revealed_seed(answer)) == commitments[node]:
                seeds[node] = revealed_seed(answer)
            else:
                failed[nodes[node]] = "revealed a self-mask seed that does not match the hash sent with its vector"
        if not failed:
            return seeds
    raise FedPGGANError("secure release: " + "; ".join(f"site {site} did not reveal its self-mask ({why})"
                                                       for site, why in sorted(failed.items()))
                        + f" after {REVEAL_TRIES} tries: the sum stays masked (no share or sum was revealed), and a site "
                        "that revealed takes part in no other attempt; start the run again, or train with "
                        "--release-aggregation plain")


def ask(grid: Grid, nodes: dict[int, str], message_type: str, content: RecordDict, record: str, failed: dict[str, str],
        timeout: float, size: int | None = None) -> dict[int, RecordDict]:
    """One step of the protocol: the sites' answers, each holding ``record``; each site that fails
    is added to ``failed`` with the reason. ``size``: the length a masked vector must have."""
    messages = [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]
    answers = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error() or record not in reply.content:
            failed[nodes[node]] = site_error(reply) if reply.has_error() else f"no '{record}' in its reply"
        elif size is not None and masked_vector(reply.content).size != size:
            failed[nodes[node]] = (f"sent a vector of {masked_vector(reply.content).size} entries, not {size}: "
                                   "it must run the coordinator's fedpggan version")
        else:
            answers[node] = reply.content
    for node in set(nodes) - set(answers):
        failed.setdefault(nodes[node], f"no answer within --round-timeout {timeout:g}s")
    return answers


def enough(nodes: dict[int, str], needed: int, left_out: dict[str, str]) -> None:
    """Stop, naming the sites that failed, when fewer than ``needed`` are left (nothing was revealed)."""
    if len(nodes) < needed:
        failed = "; ".join(f"site {site}: {why}" for site, why in sorted(left_out.items()))
        raise FedPGGANError(f"secure release: {len(nodes)} site(s) left, fewer than the {needed} it needs (--min-clients) "
                            f"({failed}); fix those sites and start the run again (nothing was revealed), "
                            "or train with --release-aggregation plain")
