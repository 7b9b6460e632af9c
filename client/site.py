"""A hospital site: its own images and its persistent privacy state.

Data: in a deployment the site's node config names its own data (``data-path``); in a
simulation, the site is partition ``partition-id`` of the run's dataset.

State: the site's accountant history lives in ``<state dir>/<run id>/site_state.json``
and is written *before* a round trains (privacy first): a process that dies mid-round has
already counted that round as spent, and a restarted site cannot overspend its budget.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedpggan.build import open_training_data, pick_device
from fedpggan.config import RunConfig, coerce
from fedpggan.data import ImageDataset, open_dataset, partition
from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_json
from fedpggan.privacy import default_delta
from fedpggan.privacy.lifetime import (JOURNAL_USED, append_reservation, check_journal_present, merge_budgets, passes_cap,
                                       read_spend_journal, reserved_budgets)
from fedpggan.privacy.peer_keys import PeerSigning, load_peer_signing
from fedpggan.privacy.secure_sum import epsilon_if_all_other_sites_collude
from fedpggan.site_config import NODE_CONFIG_KEYS, check_persistent, site_torch_device


# Node-config keys whose values are paths at the site: never named in what it tells the coordinator.
PATH_KEYS = ("data-path", "state-dir", "spend-journal", "peer-keys", "auth-private-key")


def shared_error(exc: Exception, node_config: dict[str, Any]) -> str:
    """What the site tells the coordinator about a failure: the error's ``shared`` text, or its
    message, with the site's own paths, and everything below them (a file name can be a patient
    number), replaced by their node-config keys (Flower sends a ClientApp's exception text to the
    coordinator verbatim; the site's log keeps it whole). Text after a file below the data path goes too."""
    text = getattr(exc, "shared", None) or (str(exc) if isinstance(exc, FedPGGANError) else f"{type(exc).__name__}: {exc}")
    paths = {}
    for key in PATH_KEYS:
        value = str(node_config.get(key) or "").rstrip("/")
        if value:  # every form an error may name it in: as typed, as Path writes it ("./x" -> "x"), expanded, resolved
            forms = (value, str(Path(value)), str(Path(value).expanduser()), os.path.abspath(os.path.expanduser(value)),
                     str(Path(value).expanduser().resolve()))
            paths.update({path: key for path in forms if path != "."})
    for path in sorted(paths, key=len, reverse=True):
        key, token = paths[path], rf"(?<![\w.~-]){re.escape(path)}"
        # below the data path: an image's file name (a patient number?) may hold spaces, quotes and ": ", so no
        # character can mark where it ends: the rest of the line goes (the data errors that name a file carry a
        # shared text that names none)
        files = r"/.*"
        if Path(path).is_absolute() or "/" in path:
            pattern = token + r"(?![\w.-])" + (f"(?:{files})?" if key == "data-path" else "")
        else:  # a bare relative name ("data") is this path only where a file below it follows
            pattern = token + (files if key == "data-path" else "(?=/)")
        text = re.sub(pattern, f"<{key}>", text)
    return text


def check_node_config_keys(node_config: dict[str, Any]) -> None:
    """A real site's node config holds only keys the ClientApp reads: a mistyped one ("max-total-epsilom")
    would otherwise be ignored, and the cap it was meant to set with it."""
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS)) if "data-path" in node_config else []
    if unknown:
        raise FedPGGANError(f"node config key(s) {', '.join(unknown)} unknown: a mistyped key sets nothing; the keys are "
                            f"{', '.join(NODE_CONFIG_KEYS)} (`fedpggan site check` prints a node config to start with)")


def site_identity(node_config: dict[str, Any]) -> str:
    """The site id: ``site-id`` from the node config, else the simulation partition id."""
    if "site-id" in node_config:
        return str(node_config["site-id"])
    if "partition-id" in node_config:
        return str(node_config["partition-id"])
    raise FedPGGANError("node config has neither 'site-id' nor 'partition-id'; start the SuperNode with the --node-config "
                        "that `fedpggan site check --config site.toml` prints")


def load_site_data(node_config: dict[str, Any], cfg: RunConfig) -> ImageDataset:
    """This site's training images (never leave the site)."""
    if "data-path" in node_config:
        return _open_cached(str(node_config["data-path"]), cfg.image_size)
    if "partition-id" not in node_config:
        raise FedPGGANError("node config lacks 'data-path'; start the SuperNode with the --node-config that "
                            "`fedpggan site check --config site.toml` prints")
    return _partition_cached(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.seed, cfg.partition, cfg.alpha,
                             cfg.min_per_site, int(node_config["num-partitions"]), int(node_config["partition-id"]))


def site_device(node_config: dict[str, Any], cfg: RunConfig) -> torch.device:
    """Where this site trains D. A deployed site decides (node config ``device``: auto = its
    GPU when it has one, else cpu; written from its site.toml). A simulated site uses a GPU
    only when the run gives each site a share of one (--client-gpus > 0): Ray reserved none
    otherwise. The run's own --device is the coordinator's choice and does not apply here."""
    if "device" in node_config:
        return site_torch_device(str(node_config["device"]))
    if "partition-id" in node_config:
        return pick_device("auto" if cfg.client_gpus > 0 else "cpu")
    return pick_device("auto")


def check_site_budget(node_config: dict[str, Any], cfg: RunConfig, num_records: int) -> None:
    """Refuse a run that asks for more than this site's own cap (``max-epsilon``, ``max-delta``).

    The run config comes from the coordinator; the cap is the hospital's decision, so it is
    enforced here, before any spend is reserved. ``max-epsilon="none"`` accepts runs without DP;
    a deployed site (``data-path``) must say so: a cap left out refuses every run, so that a
    hand-typed node config cannot drop it. A simulated site, whose operator holds all the data, has none."""
    if "data-path" in node_config and "max-epsilon" not in node_config:
        raise FedPGGANError("this site's node config has no max-epsilon, so it refuses every run; start the SuperNode with "
                            "the --node-config that `fedpggan site check --config site.toml` prints")
    cap = coerce("epsilon", node_config.get("max-epsilon", "none"), 0.0, "node config max-epsilon")
    if cfg.epsilon > cap:
        asked = "none (no DP)" if not cfg.dp else f"{cfg.epsilon:g}"
        raise FedPGGANError(f"the run asks for epsilon {asked} but this site's max-epsilon is {cap:g}; run with "
                            f"--run-config \"epsilon={cap:g}\" or raise max-epsilon in the site's node config")
    if not cfg.dp:
        return
    total_delta = node_config.get("max-total-delta")
    max_delta = coerce("delta", node_config.get("max-delta", 1.0 / num_records), 0.0, "node config max-delta")
    if total_delta is not None and not coerce("delta", total_delta, 0.0, "node config max-total-delta") < 1.0 / num_records:
        raise FedPGGANError(f"this site's max-total-delta {total_delta} is not below 1/n = {1 / num_records:.3g} for its "
                            f"{num_records} images: a total delta that large allows a record to leak outright; lower it")
    if total_delta is not None and "max-delta" in node_config and float(total_delta) < max_delta:
        raise FedPGGANError(f"this site's max-total-delta {total_delta} is below its max-delta {max_delta:g}: one run could "
                            "pass the lifetime cap; lower max-delta or raise max-total-delta in the site config")
    delta = cfg.delta or default_delta(num_records)
    if not delta < min(max_delta, 1.0 / num_records) + 1e-15:
        raise FedPGGANError(f"the run's delta {delta:g} is not below this site's limit {min(max_delta, 1 / num_records):g} "
                            "(max-delta, and 1/n for n records); run with a smaller --run-config delta")


def check_lifetime_budget(node_config: dict[str, Any], state: "SiteState", cfg: RunConfig) -> None:
    """Refuse a run whose (epsilon, delta), added to those of every other run in this site's
    state dir, would pass the site's lifetime caps (``max-total-epsilon``, ``max-total-delta``);
    called just before the run's first charge, after every other check that could still refuse it.

    Runs on the same records compose, and the coordinator names the run (its run id), so a cap
    per run alone does not bound what a site gives away. Privacy assumption: basic composition,
    the epsilons add up and so do the deltas; each other run counts at its budget once it
    reserved it here or spent anything (it may yet spend all of it), and a run without DP counts
    as epsilon infinite, delta 1 (no guarantee). The check and the reservation are made under one
    lock of the whole state dir, so two runs started at once cannot both fit under the caps; a
    run asking for more than it reserved is checked again. With a ``spend-journal`` (a file on
    another volume) every reservation is also appended there, and the runs it names count too, so
    a state dir restored from an older backup cannot forget them (fedpggan.privacy.lifetime)."""
    caps = {name: coerce(name, node_config[f"max-total-{name}"], 0.0, f"node config max-total-{name}")
            for name in ("epsilon", "delta") if f"max-total-{name}" in node_config}
    if not caps:
        return
    if cfg.dp and state.delta is None:
        raise RuntimeError("check_lifetime_budget needs the run's mechanism: call ensure_mechanism first")
    asked = (cfg.epsilon, state.delta if cfg.dp else 1.0)  # no DP: no guarantee, delta 1
    journal = spend_journal(node_config, state)
    reserved = [(state.lifetime_reserved or 0.0, state.lifetime_reserved_delta or 0.0)]
    if journal is not None:
        reserved.append(read_spend_journal(journal).get(state.run_id, (0.0, 0.0)))
    if all(have[0] >= asked[0] and have[1] >= asked[1] for have in reserved):
        return  # this run reserved as much before (in the journal too, when the site keeps one)
    root = state.path.parent.parent
    with exclusive(root / ".lifetime.lock"):
        in_state_dir = reserved_budgets(root)
        in_journal = {} if journal is None else read_spend_journal(journal)
        journal_only = set(in_journal) - set(in_state_dir)  # a state dir restored from an older backup lost these
        others = {run: budget for run, budget in merge_budgets(in_state_dir, in_journal).items() if run != state.run_id}
        for i, (name, value) in enumerate((("epsilon", asked[0]), ("delta", asked[1]))):
            cap = caps.get(name)
            earlier = sum(budget[i] for budget in others.values())
            if cap is not None and passes_cap(earlier, value, cap):
                runs = ", ".join(f"{run} ({budget[i]:g}{', in spend-journal only' if run in journal_only else ''})"
                                 for run, budget in others.items()) or "none"
                asks = f"{name} {value:g}" if cfg.dp else f"no DP ({name} {value:g})"
                smaller = f"run with a smaller --run-config {name}, or " if cfg.dp else ""
                raise FedPGGANError(f"the run asks for {asks} and this site's earlier runs took {earlier:g} ({runs}): "
                                    f"together above its max-total-{name} {cap:g}; {smaller}raise max-total-{name} in "
                                    "the site config only if the hospital accepts the larger total",
                                    shared=f"the run asks for {asks}, more than this site's lifetime cap (max-total-{name}) "
                                           "has left after its other studies; the site's log names them")
        if journal is not None:  # first the journal: a crash before the state is saved then counts more, not less
            for run, budget in others.items():  # runs from before the journal was kept: copied in once
                if run not in in_journal:
                    append_reservation(journal, run, *budget)
            append_reservation(journal, state.run_id, *asked)
            journal_used(state).touch()
        state.lifetime_reserved, state.lifetime_reserved_delta = asked  # the reservation the next run's check counts
        state.save()


def journal_used(state: "SiteState") -> Path:
    """The marker, in the site's state dir, that it has written to its spend journal."""
    return state.path.parent.parent / JOURNAL_USED


def spend_journal(node_config: dict[str, Any], state: "SiteState") -> str | None:
    """The site's spend journal, if it keeps one (refused when missing once used)."""
    journal = node_config.get("spend-journal")
    if journal is not None:
        check_persistent(Path(journal).parent, "spend-journal's folder")
        check_journal_present(journal, state.path.parent.parent)
    return journal


def check_collusion_cap(node_config: dict[str, Any], state: "SiteState", num_sites: int) -> None:
    """Refuse to make a share of a secure release whose worst case exceeds this site's own cap
    (``max-epsilon-if-colluding``; default its ``max-epsilon``).

    The key list, and so N, comes from the server. A server that colludes with the other sites,
    or forges the list, sees this site's share alone, with sigma/sqrt(N) of the release noise and
    an N it chose. Capping that worst case here, before the share is drawn, keeps the site's
    guarantee bounded against a malicious server too; the hospital, not the coordinator, sets it."""
    if state.release_noise is None or state.noise_multiplier is None:
        return  # no DP or no release: nothing is protected by the release noise
    default = node_config.get("max-epsilon", "none")
    cap = coerce("epsilon", node_config.get("max-epsilon-if-colluding", default), 0.0, "node config max-epsilon-if-colluding")
    worst = epsilon_if_all_other_sites_collude(state.release_noise, num_sites,
                                               (state.noise_multiplier, state.sample_rate, state.planned_steps),
                                               state.delta, state.accountant)
    if worst > cap:
        raise FedPGGANError(f"a share of a secure sum over {num_sites} sites leaves this site at epsilon {worst:.3g} if the "
                            f"others collude, above its max-epsilon-if-colluding {cap:g}: raise that in the site config "
                            "or run with --release-aggregation plain")


def peer_signing(node_config: dict[str, Any]) -> PeerSigning | None:
    """The site's roster (``peer-keys``) and SuperNode key (``auth-private-key``), or None when it
    has no roster (a simulation, or a site that trusts the server to relay keys honestly)."""
    if "peer-keys" not in node_config:
        return None
    if "auth-private-key" not in node_config:
        raise FedPGGANError("node config has 'peer-keys' but no 'auth-private-key' to sign with; write the node config "
                            "with 'fedpggan site check' (it adds both)")
    return load_peer_signing(str(node_config["peer-keys"]), str(node_config["auth-private-key"]))


# Loaded datasets are immutable; caching them per process saves reloading every round.
@functools.lru_cache(maxsize=4)
def _open_cached(path: str, image_size: int) -> ImageDataset:
    return open_dataset(path, "train", None, image_size, named_by="the node config's 'data-path' (or 'data' in "
                        "site.toml, then run 'fedpggan site check')")


# A simulation's actor serves its sites in turn; with the whole data set cached once, a site it has
# not served before costs a subset, not a reload (a folder of 55 000 PNGs took 30 s per site and round).
@functools.lru_cache(maxsize=2)
def _training_data_cached(dataset: str, data_dir: str, image_size: int, seed: int) -> ImageDataset:
    return open_training_data(RunConfig(dataset=dataset, data_dir=data_dir, image_size=image_size, seed=seed))


@functools.lru_cache(maxsize=128)  # disjoint subsets: together at most one more copy of the data
def _partition_cached(dataset: str, data_dir: str, image_size: int, seed: int, scheme: str, alpha: float,
                      min_per_site: int, num_sites: int, site: int) -> ImageDataset:
    data = _training_data_cached(dataset, data_dir, image_size, seed)
    parts = partition(data.labels.numpy(), num_sites, scheme, alpha, min_per_site, seed)
    return data.subset(parts[site])


def state_dir(node_config: dict[str, Any], config: dict[str, Any]) -> Path:
    """Where this site keeps its accountant: ``state-dir`` (deployment) or the run's sites/ folder."""
    if "state-dir" in node_config:
        path = Path(str(node_config["state-dir"]))
        if not path.is_absolute():
            raise FedPGGANError(f"state-dir {path}: a relative path is read against the folder the SuperNode happens to "
                                "start in; set an absolute state-dir in the node config (fedpggan site check writes one)",
                                shared="the site's state-dir is a relative path; the site's log says how to fix it")
        check_persistent(path, "state-dir")
        if not path.is_dir():  # never made here: a mistyped path would start a new, empty accountant
            raise FedPGGANError(f"state-dir {path}: {'is not a folder' if path.exists() else 'does not exist'}; a new "
                                "accountant there would forget this site's earlier spend: fix state-dir in the node config "
                                "(or create the folder on a persistent volume), then run 'fedpggan site check'")
        return path
    if "data-path" in node_config:  # a real site: where its spend is kept is its own decision, not the coordinator's
        raise FedPGGANError("node config has 'data-path' but no 'state-dir': a site keeps its accountant in its own "
                            "persistent folder; add state-dir=\"/state\" (or write the node config with 'fedpggan site check')")
    if config.get("site-state-root"):
        return Path(str(config["site-state-root"])) / f"site_{site_identity(node_config)}"
    raise FedPGGANError("no state directory for the site's accountant; set --node-config \"state-dir=...\"")


def run_folder(root: Path, run_id: str) -> Path:
    """The folder of one run's state under the site's state dir. The coordinator names the run,
    so a name that would lead elsewhere (a path, '..') is refused: the state, and the lifetime
    cap that reads every run's state there, must stay in the site's own folder."""
    if run_id in ("", ".", "..") or any(c in run_id for c in "/\\\0"):
        raise FedPGGANError(f"run id {run_id!r} from the coordinator is not a plain folder name; this site keeps "
                            "each run's state in a folder of its state-dir and refuses it")
    return root / run_id


@contextmanager
def site_lock(root: Path, run_id: str) -> Iterator[None]:
    """Hold the site's state for one run exclusively (an OS file lock, released even on a crash)."""
    with exclusive(run_folder(root, run_id) / ".lock"):
        yield


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An OS file lock on ``path`` (made if missing), released even on a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


RESTORE = "restore the latest copy from backup -- never delete it, or the site's spend is forgotten"


DAMAGED_CACHE = ("restore it from backup, or, if site_state.json is certainly the latest copy, move it aside (the round "
                 "it holds is then recomputed and charged again if asked for)")


def load_state_file(path: Path, fix: str = RESTORE) -> Any:
    """A tensor file of the site's state (its release, its cached reply): a damaged copy is named with ``fix``,
    never a raw traceback."""
    try:
        return torch.load(path, weights_only=True)
    except PermissionError as exc:
        raise FedPGGANError(f"{path}: cannot be read ({exc.strerror}); give the site's user read access to its state "
                            "dir") from exc
    except Exception as exc:  # a truncated zip, a damaged pickle, another format, a folder: every way a copy can break
        raise FedPGGANError(f"{path}: unreadable ({type(exc).__name__}); {fix}") from exc


REPLY_FIELDS = {"round", "input_sha"}  # what identifies a reply client_app.remember cached


def checked_state_fields(data: Any, path: Path) -> dict[str, Any]:
    """The fields of a site_state.json, refused unless each has the shape this version writes: a field read
    wrongly would misstate the site's spend (history rows are noise multiplier, sample rate, steps)."""
    if not isinstance(data, dict):
        raise FedPGGANError(f"{path}: site privacy state is corrupt (not a JSON object); {RESTORE}")
    known = {f for f in SiteState.__dataclass_fields__ if f != "path"}
    unknown = sorted(set(data) - known - {"path"})
    if unknown:
        raise FedPGGANError(f"{path}: holds field(s) this fedpggan does not know ({', '.join(unknown)}): written by a "
                            "newer version? Install the version that wrote it on this site -- never edit or delete the file")
    history, rounds, key = data.get("history", []), data.get("rounds", {}), data.get("noise_key", "")
    problems = [] if isinstance(data.get("run_id"), str) else ["no 'run_id'"]
    if not (isinstance(history, list) and all(isinstance(h, list) and len(h) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in h) for h in history)):
        problems.append("'history' is not a list of [noise multiplier, sample rate, steps] rows")
    if not (isinstance(rounds, dict) and all(isinstance(r, dict) for r in rounds.values())):
        problems.append("'rounds' is not an object of round records")
    if not isinstance(key, str) or (key and not key.startswith("simulation/") and not re.fullmatch(r"[0-9a-f]{64}", key)):
        problems.append("'noise_key' is not 64 hex digits")
    if problems:
        raise FedPGGANError(f"{path}: site privacy state is corrupt ({'; '.join(problems)}); {RESTORE}")
    return {k: v for k, v in data.items() if k != "path"}


@dataclass
class SiteState:
    """A site's privacy state for one run: mechanism, history, and what each round did."""

    path: Path
    run_id: str
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    delta: float | None = None
    budget_epsilon: float | None = None
    accountant: str = "prv"
    planned_steps: int = 0
    release_noise: float | None = None  # noise multiplier of the one-shot embedding release
    release_share_of: int = 0  # N when the release is this site's share of a secure sum over N sites (0: plain)
    release_signers: list[str] = field(default_factory=list)  # the peers whose signed keys its share was masked towards
    release_key: str = ""  # what the release was drawn from (client.site_round.release_key): a redraw must match it
    lifetime_reserved: float | None = None  # the epsilon this run reserved against the site's max-total-epsilon
    lifetime_reserved_delta: float | None = None  # the delta it reserved against max-total-delta
    trained_without_dp: bool = False  # a round of this run read the data without DP: no guarantee at all
    noise_key: str = ""  # secret seed material of this site's noise: never leaves the site
    noise_source: str | None = None  # --noise-key the DP mechanism was fixed with (None: a state saved before it was kept)
    history: list[list[float]] = field(default_factory=list)
    rounds: dict[str, dict[str, Any]] = field(default_factory=dict)
    exhausted: bool = False

    @classmethod
    def load(cls, root: Path, run_id: str) -> "SiteState":
        path = run_folder(root, run_id) / "site_state.json"
        if not path.exists():
            state = cls(path=path, run_id=run_id)
        else:
            try:
                data = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise FedPGGANError(f"{path}: site privacy state is corrupt ({exc}); {RESTORE}") from exc
            state = cls(path=path, **checked_state_fields(data, path))
        state.check_not_behind()
        return state

    def cached_reply(self) -> dict[str, Any] | None:
        """The site's latest reply as client_app.remember kept it, or None. A damaged one is refused with what to do:
        it may be set aside once site_state.json is known to be the latest copy (the cache only spares a recomputation:
        a round asked again without it is recomputed with the same noise and charged again), but beside a state
        restored from an older backup it is the record of a round that state forgot."""
        if not self.reply_cache.exists():
            return None
        cached = load_state_file(self.reply_cache, DAMAGED_CACHE)
        if not (isinstance(cached, dict) and REPLY_FIELDS <= cached.keys()):
            raise FedPGGANError(f"{self.reply_cache}: not a reply this site cached; {DAMAGED_CACHE}")
        return cached

    def check_not_behind(self) -> None:
        """Refuse a state that is missing or older than the files beside it (an earlier backup
        restored, a reset or deleted file): it would under-count the site's spend. Those files are
        written only after the state that charged them."""
        behind = {}  # file -> what this state fails to record about it
        # a site makes its key before its release or share, and a private release is charged before it is drawn
        for drawn in (self.release_file, self.self_mask_file, self.revealed_file):
            if drawn.exists() and (not self.noise_key or (self.release_noise is not None and not self.history)):
                behind[drawn.name] = "exists but no spend is recorded"
        if self.reply_cache.exists() and not self.path.exists():
            behind[self.reply_cache.name] = "exists but no spend is recorded"
        elif (cached := self.cached_reply()) is not None:
            done = self.rounds.get(str(cached["round"]), {})
            if done.get("status") != "done" or done.get("input_sha") != cached["input_sha"]:
                behind[self.reply_cache.name] = f"holds round {cached['round']}, which it does not record as done"
        if behind and not self.path.exists():
            names = list(behind)
            raise FedPGGANError(f"{self.path}: missing, but {', '.join(names)} beside it show{'s' if len(names) == 1 else ''} "
                                "this site already spent privacy in this run; restore site_state.json from backup "
                                "-- never delete it, or the site's spend is forgotten")
        if behind:
            raise FedPGGANError(f"{self.path}: older than the files beside it ("
                                + "; ".join(f"{name} {why}" for name, why in behind.items())
                                + "): it would under-count this site's spend; restore the latest copy of site_state.json")

    def save(self) -> None:
        data = asdict(self)
        data.pop("path")
        atomic_write_json(self.path, data)

    @property
    def release_file(self) -> Path:
        return self.path.parent / "embedding_release.pt"

    @property
    def secure_key_file(self) -> Path:
        """The private key of the secure release in progress (used once, then deleted)."""
        return self.path.parent / "secure_release.key"

    @property
    def self_mask_file(self) -> Path:
        """This site's public key and self-mask seed of its latest secure-release vector (64 bytes)."""
        return self.path.parent / "secure_release.self_mask"

    @property
    def revealed_file(self) -> Path:
        """The public key of the one secure-release attempt whose self-mask seed this site revealed.
        A file of its own, written before the seed leaves: restoring site_state.json from a backup
        must not let the site reveal a second seed."""
        return self.path.parent / "secure_release.revealed"

    @property
    def reply_cache(self) -> Path:
        return self.path.parent / "last_reply.pt"
