"""A hospital site's configuration file (see deploy/site.example.toml).

One TOML file holds everything a site decides for itself: its id, where its images are,
where its accountant state lives, the most privacy budget it will spend, and how it reaches
the coordinator. ``fedpggan site check`` validates it; :meth:`SiteConfig.supernode_command`
turns it into the ``flower-supernode`` command, so the node config the ClientApp reads
(client/site.py) is written in one place only.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpggan.build import pick_device
from fedpggan.config import read_toml
from fedpggan.errors import FedPGGANError

TEMPLATE = "deploy/site.example.toml"
SITE_DEVICES = ("auto", "cpu", "cuda")  # the ClientApp reads the node config's device (client/site.py)
# Every key a site config may hold, per table ("" is the top level). A key outside these is a typo
# that would otherwise drop a privacy cap or the peer roster without a word.
SITE_KEYS = {"": {"site-id", "data", "state-dir", "image-size", "device", "privacy", "superlink"},
             "privacy": {"max-epsilon", "max-total-epsilon", "max-total-delta", "max-epsilon-if-colluding", "max-delta", "peer-keys",
                         "spend-journal"},
             "superlink": {"address", "root-certificates", "auth-private-key"}}


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    site_id: str
    data: str
    state_dir: Path
    image_size: int | None
    max_epsilon: float  # math.inf: the site accepts runs without DP
    max_delta: float | None
    superlink: str
    root_certificates: Path | None  # None only with --insecure (local tests)
    auth_private_key: Path
    device: str = "auto"  # where the site trains D: auto (its GPU when it has one), cpu or cuda
    max_epsilon_if_colluding: float | None = None  # cap on a secure release's worst case (None: max_epsilon)
    peer_keys: Path | None = None  # the consortium's SuperNode public keys: a secure release's key list is checked against them
    max_total_epsilon: float | None = None  # cap on the epsilons of all runs on this site's records, added up (None: no cap)
    max_total_delta: float | None = None  # cap on their deltas, added up (None: no cap)
    spend_journal: Path | None = None  # every lifetime reservation, also kept outside state-dir (None: none kept)

    def node_config(self) -> str:
        """The SuperNode's ``--node-config``; string values must be quoted for Flower."""
        items = {"site-id": self.site_id, "data-path": self.data, "state-dir": str(self.state_dir),
                 "max-epsilon": "none" if math.isinf(self.max_epsilon) else self.max_epsilon, "device": self.device}
        if self.max_total_epsilon is not None:
            items["max-total-epsilon"] = self.max_total_epsilon
        if self.max_total_delta is not None:
            items["max-total-delta"] = self.max_total_delta
        if self.spend_journal is not None:
            items["spend-journal"] = str(self.spend_journal)
        if self.max_delta is not None:
            items["max-delta"] = self.max_delta
        if self.max_epsilon_if_colluding is not None:
            items["max-epsilon-if-colluding"] = self.max_epsilon_if_colluding
        if self.peer_keys is not None:  # the ClientApp signs its secure-release key with the SuperNode's own key
            items.update({"peer-keys": str(self.peer_keys), "auth-private-key": str(self.auth_private_key)})
        return " ".join(f"{k}={node_config_text(k, v)}" if isinstance(v, str) else f"{k}={v!r}" for k, v in items.items())

    def supernode_command(self) -> list[str]:
        tls = ["--root-certificates", str(self.root_certificates)] if self.root_certificates else ["--insecure"]
        return ["flower-supernode", "--superlink", self.superlink, *tls,
                "--auth-supernode-private-key", str(self.auth_private_key), "--node-config", self.node_config()]

    def supernode_command_line(self) -> str:
        return shlex.join(self.supernode_command())


# Every --node-config key the ClientApp reads at a real site (client/site.py); SiteConfig.node_config writes them.
NODE_CONFIG_KEYS = ("site-id", "data-path", "state-dir", "max-epsilon", "device", "max-total-epsilon", "max-total-delta",
                    "spend-journal", "max-delta", "max-epsilon-if-colluding", "peer-keys", "auth-private-key")


# Set in the site image (deploy/Dockerfile.site): there a folder that is no mounted volume lives in the
# container's own layer and goes with the container, the site's privacy spend with it.
MUST_BE_MOUNTED = "FEDPGGAN_STATE_MUST_BE_MOUNTED"


def check_persistent(path: Path, key: str) -> None:
    """Refuse, in the site image, a ``key`` folder (state-dir, the spend journal's) on no mounted volume."""
    if os.environ.get(MUST_BE_MOUNTED) != "1":
        return
    folder = Path(os.path.abspath(path))
    if not any(os.path.ismount(p) for p in (folder, *folder.parents) if p != Path(p.anchor)):
        raise FedPGGANError(f"{key} {path}: no volume is mounted there, so the site's privacy spend would vanish with the "
                            f"container; mount a persistent volume (docker run -v fedpggan-state:{path}) and start again")


def node_config_text(key: str, value: str) -> str:
    """``value`` as Flower reads a --node-config value: a TOML string, which Flower finds by a
    pattern that stops at the first quote of its kind, so a double-quoted value (backslashes
    escaped) cannot hold a double quote and a single-quoted one (taken literally) no single quote."""
    if '"' not in value:
        return json.dumps(value, ensure_ascii=False)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    raise FedPGGANError(f"{key} {value!r} holds both kinds of quote (or a quote and a line break), which Flower's "
                        "--node-config cannot carry; rename it in the site config")


def site_torch_device(name: str) -> torch.device:
    """The device a site's ``device`` setting names; a site that asks for a GPU it does not
    have fails here, in one line, rather than in its first round."""
    if name not in SITE_DEVICES:
        raise FedPGGANError(f"site device {name!r} is invalid: set device to one of {', '.join(SITE_DEVICES)} "
                            f"in the site config (see {TEMPLATE})")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedPGGANError('site device "cuda": this machine sees no CUDA GPU; set device = "auto" or "cpu" in '
                            "the site config, or fix the GPU driver")
    return pick_device(name)


def load_site_config(path: str | Path, insecure: bool = False) -> SiteConfig:
    """Read and type-check ``path``; each problem is one line naming the key and the fix."""
    path = Path(path)
    data = read_toml(path, f"start from {TEMPLATE}")
    get = _Getter(path, data)
    privacy, link = get.table("privacy"), get.table("superlink")
    for table, keys in (("", data), ("privacy", privacy), ("superlink", link)):
        unknown = sorted(set(keys) - SITE_KEYS[table])
        if unknown:
            where = f"in [{table}]" if table else "at the top level"
            raise FedPGGANError(f"--config {path}: unknown key {unknown[0]!r} {where}; the keys there are "
                                f"{', '.join(sorted(SITE_KEYS[table] - {'privacy', 'superlink'}))} (see {TEMPLATE})")
    max_epsilon = get.value(privacy, "privacy.max-epsilon", (int, float, str))
    if isinstance(max_epsilon, str):
        if max_epsilon.strip().lower() != "none":
            raise get.error("privacy.max-epsilon", "a number > 0 or \"none\"")
        max_epsilon = math.inf
    elif not 0 < max_epsilon < math.inf:  # inf (or nan) would read as "none", which also accepts runs without DP
        raise get.error("privacy.max-epsilon", "a finite number > 0 (e.g. 10) or \"none\"")
    total = get.value(privacy, "privacy.max-total-epsilon", (int, float), required=False)
    if total is not None and not (math.isfinite(max_epsilon) and total >= max_epsilon):
        raise get.error("privacy.max-total-epsilon", "a number at least max-epsilon (which must then be a number: a run "
                                                     "without DP would pass any lifetime cap), or leave it out for no cap")
    colluding = get.value(privacy, "privacy.max-epsilon-if-colluding", (int, float), required=False)
    if colluding is not None and not 0 < colluding < math.inf:
        raise get.error("privacy.max-epsilon-if-colluding", "a number > 0 (e.g. 20), or leave it out to use max-epsilon")
    max_delta = get.value(privacy, "privacy.max-delta", (int, float), required=False)
    peer_keys = get.value(privacy, "privacy.peer-keys", str, required=False)
    if max_delta is not None and not 0 < max_delta < 1:
        raise get.error("privacy.max-delta", "a number in (0, 1), e.g. 1e-5")
    total_delta = get.value(privacy, "privacy.max-total-delta", (int, float), required=False)
    if total_delta is not None and not (math.isfinite(max_epsilon) and 0 < total_delta < 1
                                        and (max_delta is None or total_delta >= max_delta)):
        raise get.error("privacy.max-total-delta", f"a number in (0, 1), at least max-delta ({max_delta}; lower that if it "
                                                   "is the mistake), with max-epsilon a number (e.g. 1e-4 for ten runs at "
                                                   "1e-5), or leave it out for no cap")
    journal = get.value(privacy, "privacy.spend-journal", str, required=False)
    if journal is not None and total is None and total_delta is None:
        raise get.error("privacy.spend-journal", "left out, or set together with max-total-epsilon or max-total-delta "
                                                 "(it records the reservations those lifetime caps make)")
    if not insecure and link.get("root-certificates") is None:
        raise FedPGGANError(f"--config {path}: required key 'superlink.root-certificates' is missing; set it to the "
                            "coordinator's ca.crt (or pass --insecure, for local tests only)")
    certs = get.value(link, "superlink.root-certificates", str, required=False)
    image_size = get.value(data, "image-size", int, required=False)
    device = get.value(data, "device", str, required=False) or "auto"
    if device not in SITE_DEVICES:
        raise get.error("device", f"one of {', '.join(repr(d) for d in SITE_DEVICES)}")
    def local(value: str) -> Path:
        """A relative path is read against the config's own folder, never the directory a command
        happens to run in: a SuperNode started elsewhere must find the same state dir."""
        given = Path(value).expanduser()
        return given if given.is_absolute() else Path(os.path.normpath(path.parent.absolute() / given))

    data_spec = get.value(data, "data", str)
    if any(sep in data_spec for sep in ("/", os.sep)) or Path(data_spec).suffix or (path.parent / data_spec).exists():
        data_spec = str(local(data_spec))  # else a MedMNIST name, looked up as --dataset does
    return SiteConfig(
        path=path, site_id=get.value(data, "site-id", str), data=data_spec,
        state_dir=local(get.value(data, "state-dir", str)), image_size=image_size,
        max_epsilon=float(max_epsilon), max_delta=None if max_delta is None else float(max_delta),
        superlink=_address(get, get.value(link, "superlink.address", str)), root_certificates=local(certs) if certs else None,
        auth_private_key=local(get.value(link, "superlink.auth-private-key", str)), device=device,
        max_epsilon_if_colluding=None if colluding is None else float(colluding),
        peer_keys=local(peer_keys) if peer_keys else None, max_total_epsilon=None if total is None else float(total),
        max_total_delta=None if total_delta is None else float(total_delta),
        spend_journal=None if journal is None else local(journal),
    )


def _address(get: _Getter, address: str) -> str:
    """The SuperLink's ``host:port``; flower-supernode would only fail on it after starting."""
    host, _, port = address.rpartition(":")
    # a URL ("https://host:port") would become "https://https://..." inside flower-supernode
    if not host or "/" in address or any(c.isspace() for c in address) or not port.isdigit() or not 0 < int(port) < 65536:
        raise get.error("superlink.address", f"host:port (e.g. \"coordinator.example.org:8000\"), not {address!r}")
    return address


class _Getter:
    """Typed look-ups in the parsed TOML that fail with the file, the key and an example."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def error(self, key: str, expected: str) -> FedPGGANError:
        return FedPGGANError(f"--config {self.path}: '{key}' must be {expected}; see {TEMPLATE}")

    def table(self, name: str) -> dict[str, Any]:
        table = self.data.get(name)
        if not isinstance(table, dict):
            raise FedPGGANError(f"--config {self.path}: table [{name}] is missing; copy it from {TEMPLATE}")
        return table

    def value(self, table: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        value = table.get(key.rsplit(".", 1)[-1])
        if value is None:
            if required:
                raise FedPGGANError(f"--config {self.path}: required key '{key}' is missing; see {TEMPLATE}")
            return None
        if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(key, f"a non-empty {names}, not {value!r}")
        return value
