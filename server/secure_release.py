"""The server's side of the secure release (fedpggan.privacy.secure_sum): ask each site for a
one-run key, relay the key list, add up the masked vectors, and once all are in, ask for the
self-mask seeds. A site that fails the key step is left out of the key list; one that fails the
vector step is left out and the others start again with fresh keys, each topping its share up
for the smaller sum, until every site of an attempt has sent its vector or too few are left. A
reveal that still fails after retries stops the protocol."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpggan.errors import FedPGGANError
from fedpggan.privacy.secure_sum import check_public_key, seed_commitment, unmasked_sum
from fedpggan.wire import (answering_node, destinations, key_list_record, masked_vector, revealed_seed, seed_commitment_of,
                           share_made_for, site_error, verified_signers)

REVEAL_TRIES = 3  # asking a site again for the same seed is safe: a failed reveal is retried
T = TypeVar("T")


class SecureSumFailed(FedPGGANError):
    """The protocol stopped before the sum was unmasked. ``made_for``: per site that was sent a key list,
    the N its share was first made for (its least noisy share, had it made one, carries sigma / sqrt(N))."""

    def __init__(self, message: str, made_for: dict[str, int]) -> None:
        super().__init__(message)
        self.made_for = made_for


@dataclass
class SecureSum:
    pooled: torch.Tensor  # the sum of the shares of ``sites``: all the server learns
    sites: list[str]  # whose shares make the sum
    made_for: dict[str, int]  # site -> N its share was first made for: its least noisy share has sigma / sqrt(N)
    left_out: dict[str, str]  # site -> why its share is not in the sum
    signers: dict[str, list[str]]  # site -> the peers whose signed keys it checked ([]: none)


def secure_sum(grid: Grid, nodes: dict[int, str], config: ConfigRecord, shape: tuple[int, ...], needed: int,
               timeout: float) -> SecureSum:
    """Run the protocol with ``nodes`` (node id -> site id). Nothing is unmasked unless every
    site of an attempt sent its vector and its seed; a stop raises :class:`SecureSumFailed`."""
    first_list: dict[int, int] = {}  # node -> the size of the first key list the server sent it (what its share is made for)
    try:
        return _attempts(grid, dict(nodes), config, shape, needed, timeout, first_list)
    except Exception as exc:  # also the grid's own errors: the ledger must say what each site may have sent
        message = str(exc) if isinstance(exc, FedPGGANError) else f"secure release: {type(exc).__name__}: {exc}"
        raise SecureSumFailed(message, {nodes[n]: size for n, size in first_list.items()}) from exc


def _attempts(grid: Grid, nodes: dict[int, str], config: ConfigRecord, shape: tuple[int, ...], needed: int, timeout: float,
              first_list: dict[int, int]) -> SecureSum:
    """:func:`secure_sum`'s attempts, filling ``first_list`` as key lists go out."""
    left_out: dict[str, str] = {}
    while True:
        enough(nodes, needed, left_out)
        keys = ask(grid, nodes, "query.release_keys", RecordDict({"config": config}), read_key, left_out, timeout)
        keys = without_copied_keys(keys, nodes, left_out)
        nodes = {n: s for n, s in nodes.items() if n in keys}
        enough(nodes, needed, left_out)
        order = sorted(nodes)
        content = RecordDict({"config": config, "keys": key_list_record([keys[n] for n in order])})
        for n in order:
            first_list.setdefault(n, len(order))
        vectors = ask(grid, nodes, "query.release_masked", content, functools.partial(read_vector, size=math.prod(shape)),
                      left_out, timeout)
        for n in [n for n in vectors if vectors[n].made_for != first_list[n]]:  # before anyone reveals
            left_out[nodes[n]] = (f"says its share was made for {vectors[n].made_for} sites, but the first key list it "
                                  f"was sent had {first_list[n]}: its noise would be misstated")
            del vectors[n]
        if len(vectors) == len(order):
            break
        # This attempt's vectors hold masks towards the failed sites: start again without them.
        nodes = {n: s for n, s in nodes.items() if n in vectors}
    seeds = reveal(grid, nodes, content, {n: vectors[n].commitment for n in order}, timeout)
    pooled = unmasked_sum([vectors[n].masked for n in order], [seeds[n] for n in order], shape)
    # The N each share was made for: the first key list the server sent that site (the site's word was checked against it)
    made_for = {nodes[n]: first_list[n] for n in order}
    return SecureSum(pooled, sorted(nodes.values()), made_for, left_out, {nodes[n]: vectors[n].signers for n in order})


@dataclass
class Vector:
    """A site's step-2 answer."""
    masked: np.ndarray
    made_for: int
    commitment: bytes
    signers: list[str]


def read_key(content: RecordDict) -> RecordDict:
    """A key reply the key list can carry: a valid public key, and a signer and signature only as bytes."""
    check_public_key(bytes(content["key"]["public-key"]))
    for field in ("signer", "signature"):
        if not isinstance(content["key"].get(field, b""), bytes):
            raise TypeError(f"a {field} that is not bytes")
    return content


def without_copied_keys(keys: dict[int, RecordDict], nodes: dict[int, str], left_out: dict[str, str]) -> dict[int, RecordDict]:
    """Leave out every site whose public key another site also sent: one of them copied it, and a
    repeated key would make every honest site refuse the list."""
    raw = {n: bytes(k["key"]["public-key"]) for n, k in keys.items()}
    copied = {n for n in raw if list(raw.values()).count(raw[n]) > 1}
    for n in copied:
        left_out[nodes[n]] = "sent the same public key as another site (a copied key)"
    return {n: k for n, k in keys.items() if n not in copied}


def read_vector(content: RecordDict, size: int) -> Vector:
    vector = Vector(masked_vector(content), share_made_for(content), seed_commitment_of(content), verified_signers(content))
    if vector.masked.size != size:
        raise ValueError(f"a vector of {vector.masked.size} entries, not {size}")
    if len(vector.commitment) != 32:  # without it no seed could pass the reveal: leave the site out before anyone reveals
        raise ValueError("no hash of its self-mask seed")
    return vector


def read_seed(content: RecordDict) -> bytes:
    seed = revealed_seed(content)
    if len(seed) != 32:
        raise ValueError("a self-mask seed of the wrong length")
    return seed


def reveal(grid: Grid, nodes: dict[int, str], content: RecordDict, commitments: dict[int, bytes],
           timeout: float) -> dict[int, bytes]:
    """Every site's self-mask seed for this attempt, checked against the hash it sent with its
    vector. A site re-sends the same seed when asked again, so a failed reveal is retried."""
    seeds: dict[int, bytes] = {}
    for _ in range(REVEAL_TRIES):
        failed: dict[str, str] = {}
        answers = ask(grid, {n: s for n, s in nodes.items() if n not in seeds}, "query.release_reveal", content, read_seed,
                      failed, timeout)
        for node, seed in answers.items():
            if seed_commitment(seed) == commitments[node]:
                seeds[node] = seed
            else:
                failed[nodes[node]] = "revealed a self-mask seed that does not match the hash sent with its vector"
        if not failed:
            return seeds
    raise FedPGGANError("secure release: " + "; ".join(f"site {site} did not reveal its self-mask ({why})"
                                                       for site, why in sorted(failed.items()))
                        + f" after {REVEAL_TRIES} tries: the sum stays masked to this server (unless a site that did not "
                        "reveal hands its seed over outside the protocol), and a site that revealed takes part in no other "
                        "attempt; start the run again (every site charges the new run's release too, and its "
                        "max-total-epsilon counts both runs), or train with --release-aggregation plain")


def ask(grid: Grid, nodes: dict[int, str], message_type: str, content: RecordDict, read: Callable[[RecordDict], T],
        failed: dict[str, str], timeout: float) -> dict[int, T]:
    """One step of the protocol: what ``read`` takes from each site's answer. A site that fails, stays
    silent or sends what ``read`` cannot take is added to ``failed`` with the reason."""
    messages = [Message(content, dst_node_id=n, message_type=message_type, ttl=timeout) for n in nodes]  # never taken up late
    answers: dict[int, T] = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent = destinations(messages)
    for reply in replies:
        node = answering_node(reply, sent)
        if node not in nodes:  # no message of this step went there: nothing to take from it
            continue
        if reply.has_error():
            failed[nodes[node]] = site_error(reply)
            continue
        try:
            answers[node] = read(reply.content)
        except Exception as exc:  # whatever a site's bytes raise (empty arrays: EOFError), never the server's end
            failed[nodes[node]] = f"sent a malformed reply ({exc}): it must run the coordinator's fedpggan version"
    for node in set(nodes) - set(answers):
        failed.setdefault(nodes[node], f"no answer within --round-timeout {timeout:g}s")
    return answers


def enough(nodes: dict[int, str], needed: int, left_out: dict[str, str]) -> None:
    """Stop, naming the sites that failed, when fewer than ``needed`` are left (nothing was revealed)."""
    if len(nodes) < needed:
        failed = "".join(f"; site {site}: {why}" for site, why in sorted(left_out.items()))
        raise FedPGGANError(f"secure release: {len(nodes)} site(s) left, fewer than the {needed} it needs (--min-clients)"
                            f"{failed}; fix those sites and start the run again (nothing was revealed), "
                            "or train with --release-aggregation plain")
