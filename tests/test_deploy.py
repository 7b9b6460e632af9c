"""Deployment: real ``flower-superlink`` / ``flower-supernode`` / ``flwr`` processes on 127.0.0.1
with TLS and SuperNode authentication, the container files, and ``fedpggan site check``.

The Flower console scripts are taken from this interpreter's environment (``pip install .``
puts them next to ``python``); every process is started in its own session and stopped, with
everything it spawned, when the module ends, also after a failure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.common.config import parse_config_args

import torch

from client.site import check_site_budget, site_device
from fedpggan.cli import main as cli_main
from fedpggan.config import RunConfig, flag
from fedpggan.data import open_dataset
from fedpggan.errors import FedPGGANError
from fedpggan.site_config import NODE_CONFIG_KEYS

from conftest import REPO, write_ssh_key

BIN = Path(sys.executable).parent
DEPLOY = REPO / "deploy"
SITES = ("hospital-1", "hospital-2", "hospital-3")
RUN_CONFIG = ("clients=3 rounds=2 local-steps=1 g-steps=1 batch-size=8 g-batch-size=8 g-width=16 d-width=8 "
              "latent-dim=16 image-size=16 epsilon=10.0 embedding-frequencies=50 round-timeout=120.0 seed=0")
RUN_TIMEOUT = 300.0
VOLUME = re.compile(r"(.+):(/[^:]+)(:ro)?")  # compose "source:target[:ro]"


# --- helpers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode} before listening on {port}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Flower starts its SuperExec in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


class Processes:
    """Processes this test module started; :meth:`stop_all` ends them and their children."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self.env.pop("PYTHONPATH", None)  # the apps must come from the FAB and the installed packages

    def start(self, name: str, *args: str) -> subprocess.Popen:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, "FLWR_HOME": str(home)}, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        family = {pid for proc in self.procs.values() for pid in descendants(proc.pid)}
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def write_site_npz(path: Path, index: int, n: int = 40) -> None:
    """Site ``index``'s own images: a disjoint slice of phantom, in the MedMNIST npz layout."""
    data = open_dataset("phantom", "train", image_size=16)
    rows = slice(index * n, (index + 1) * n)
    images = np.round((data.images.numpy()[rows, 0] + 1) * 127.5).astype(np.uint8)
    np.savez(path, train_images=images, train_labels=data.labels.numpy()[rows, None])


def flwr_cli(procs: Processes, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=home, env={**procs.env, "FLWR_HOME": str(home)},
                          capture_output=True, text=True, timeout=120)


# --- the federation --------------------------------------------------------------------------
@dataclasses.dataclass
class Federation:
    root: Path
    procs: Processes
    port: int
    cli_home: Path
    ca: Path

    def state_dir(self, site: str) -> Path:
        return self.root / "state" / site


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    procs = Processes(root / "proc")
    try:
        certs, keys = root / "certs", root / "keys"
        subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(certs)], check=True, capture_output=True)
        keys.mkdir()
        for name in (*SITES, "intruder"):
            write_ssh_key(keys / name)
        port = free_port()
        link = procs.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
                           "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                           "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                           "--host", "127.0.0.1", "--port", str(port))
        wait_for_port(port, link)
        cli_home = root / "cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{certs / "ca.crt"}"\n')
        registering = [subprocess.Popen([str(BIN / "flwr"), "supernode", "register", str(keys / f"{s}.pub"), "fed"],
                                        cwd=cli_home, env={**procs.env, "FLWR_HOME": str(cli_home)},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in SITES]
        for proc in registering:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "registered successfully" in out, out
        # the roster each hospital receives out of band, for signed keys in a secure release
        (keys / "peers.pub").write_text("".join(f"{(keys / f'{s}.pub').read_text().strip()} {s}\n" for s in SITES))
        fed = Federation(root, procs, port, cli_home, certs / "ca.crt")
        for i, site in enumerate(SITES):
            write_site_npz(root / f"{site}.npz", i)
            fed.state_dir(site).mkdir(parents=True)  # a site's state dir exists before it joins (site check asks for it)
            node_config = (f'site-id="{site}" data-path="{root / f"{site}.npz"}" '
                           f'state-dir="{fed.state_dir(site)}" max-epsilon=10.0 max-epsilon-if-colluding=1000.0 '
                           f'peer-keys="{keys / "peers.pub"}" auth-private-key="{keys / site}"')
            procs.start(site, "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                        str(fed.ca), "--auth-supernode-private-key", str(keys / site), "--port", str(free_port()),
                        "--node-config", node_config)
        # Started now, checked by their own tests, so they run while the federation trains.
        refused = ("--max-retries", "1", "--max-wait-time", "5", "--node-config", 'site-id="intruder"')
        procs.start("unregistered", "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                    str(fed.ca), "--auth-supernode-private-key", str(keys / "intruder"), "--port", str(free_port()),
                    *refused)
        procs.start("no-ca", "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                    "--auth-supernode-private-key", str(keys / SITES[0]), "--port", str(free_port()), *refused)
        yield fed
    finally:
        procs.stop_all()


def run_to_the_end(federation, out: Path, run_config: str) -> None:
    started = flwr_cli(federation.procs, federation.cli_home, "run", str(REPO), "fed",
                       "--run-config", f"{run_config} out='{out}'")
    assert started.returncode == 0 and "Successfully started run" in started.stdout, started.stdout + started.stderr
    deadline, status = time.monotonic() + RUN_TIMEOUT, None
    while time.monotonic() < deadline and status not in ("completed", "stopped", "failed"):
        time.sleep(2)
        status = json.loads((out / "run.json").read_text()).get("status") if (out / "run.json").exists() else None
    logs = "\n".join(federation.procs.log(n)[-2000:] for n in ("superlink", *SITES))
    assert status == "completed", f"run status {status!r}\n{logs}"


def test_federated_dp_run_over_tls_with_registered_sites(federation):
    out = federation.root / "run"
    run_to_the_end(federation, out, RUN_CONFIG)
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "federated" and run["num_sites"] == 3 and run["config"]["epsilon"] == 10.0
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert ledger["dp"] is True and set(ledger["sites"]) == set(SITES)
    for site, entry in ledger["sites"].items():
        assert [r["round"] for r in entry["rounds"]] == [1, 2], site
        assert 0 < entry["epsilon"] <= entry["budget_epsilon"] == 10.0
        state = json.loads((federation.state_dir(site) / out.name / "site_state.json").read_text())
        assert set(state["rounds"]) == {"1", "2"} and all(r["status"] == "done" for r in state["rounds"].values())
        assert state["history"] and state["budget_epsilon"] == 10.0  # the accountant survives the process


def test_secure_release_masks_only_towards_keys_the_peers_signed(federation):
    out = federation.root / "secure-run"
    run_to_the_end(federation, out, f"{RUN_CONFIG} release-aggregation='secure'")
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    for site, entry in ledger["sites"].items():
        assert entry["feature_release"]["key_list"] == {"verified": True, "signers": sorted(SITES)}, site
        state = json.loads((federation.state_dir(site) / out.name / "site_state.json").read_text())
        assert sorted(state["release_signers"]) == sorted(SITES) and state["release_share_of"] == 3
    audit = subprocess.run([str(BIN / "fedpggan"), "audit", str(out)], capture_output=True, text=True)
    assert audit.returncode == 0 and "checked every key's signature against its peer-keys" in audit.stdout, \
        audit.stdout + audit.stderr


def finished(federation, name: str) -> str:
    proc = federation.procs.procs[name]
    proc.wait(timeout=120)
    assert proc.returncode != 0, f"{name} should have been refused"
    return federation.procs.log(name)


def test_supernode_with_unregistered_key_is_refused(federation):
    log = finished(federation, "unregistered")
    assert "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in federation.procs.log("superlink")


def test_supernode_without_the_ca_certificate_cannot_connect(federation):
    log = finished(federation, "no-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log


# --- container files and the app's Flower config (no Docker daemon needed) -----------------------
def test_container_images_use_the_pinned_flower_version():
    pinned = re.search(r'"flwr\[simulation\]==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pinned == version("flwr")
    python = re.search(r'requires-python = ">=(3\.\d+)', (REPO / "pyproject.toml").read_text()).group(1)
    # A bare version tag is Alpine (musl) with Flower's newest Python: pip install . cannot work there.
    # flwr/superlink is built for that Python only, so the coordinator starts from flwr/base.
    for dockerfile, image in (("Dockerfile.site", "supernode"), ("Dockerfile.coordinator", "base")):
        bases = re.findall(r"^FROM\s+(\S+)", (DEPLOY / dockerfile).read_text(), re.MULTILINE)
        assert bases == [f"flwr/{image}:{pinned}-py{python}-ubuntu24.04"], dockerfile
    assert 'ENTRYPOINT ["flower-superlink"]' in (DEPLOY / "Dockerfile.coordinator").read_text()


def test_a_site_image_runs_its_installed_code_never_the_coordinators_app_bundle(tmp_path):
    """Flower unpacks the FAB `flwr run` sends under $FLWR_HOME/apps and puts it first on sys.path; the
    site image's .pth line (the one Dockerfile.site writes) makes Python import the installed copy."""
    from client import installed_code_only

    assert "RUN python -m client.installed_code_only" in (DEPLOY / "Dockerfile.site").read_text()
    (tmp_path / "site-packages").mkdir()
    installed_code_only.write_pth(tmp_path / "site-packages")  # what `python -m client.installed_code_only` writes
    bundle = tmp_path / "flwr" / "apps" / "fedpggan.fedpggan.0.1.0.0123456789"
    for package in ("client", "fedpggan", "pggan_model"):  # as `flwr build` packs them (pyproject fab-include)
        (bundle / package).mkdir(parents=True)
        (bundle / package / "__init__.py").write_text("raise SystemExit('the bundle ran its own code')\n")
    (bundle / "google").mkdir()  # a portion of a namespace package Flower has imported (protobuf's google)
    for name in ("client/client_app.py", "exfiltrate.py", "google/exfiltrate.py"):
        (bundle / name).write_text("raise SystemExit('the bundle ran its own code')\n")
    probe = (f"import site, sys\n{{}}import google.protobuf\nsys.path.insert(0, {str(bundle)!r})\n"
             "import client.client_app\nprint(client.__file__)\n"
             "for name in ('exfiltrate', 'google.exfiltrate'):\n"
             "    try:\n        __import__(name)\n    except ImportError as exc:\n        print('refused:', exc)\n")
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr")}
    run = lambda guard: subprocess.run([sys.executable, "-c", probe.format(guard)], capture_output=True, text=True, env=env, timeout=300)
    unguarded = run("")  # what Flower does without the guard: the bundle's code runs
    assert "the bundle ran its own code" in unguarded.stderr
    guarded = run(f"site.addsitedir({str(tmp_path / 'site-packages')!r})\n")
    assert guarded.returncode == 0, guarded.stderr
    installed, *refused = guarded.stdout.splitlines()
    assert bundle not in Path(installed).parents and (Path(installed).parent / "site_round.py").is_file()  # the real package
    assert refused == [f"refused: {name}: the coordinator's app bundle provides this module and this site has no installed "
                       "copy of it; a site runs only the fedpggan it installed (deploy/Dockerfile.site)"
                       for name in ("exfiltrate", "google.exfiltrate")]


def test_the_server_certificate_is_renewed_with_the_sites_ca_kept(tmp_path):
    """A new CA would lock every site out until each had the new ca.crt: renewing the SuperLink's
    certificate reuses ca.key, and the script never overwrites a file."""
    make = ["bash", str(DEPLOY / "make-certs.sh"), str(tmp_path)]
    subprocess.run(make, check=True, capture_output=True)
    ca = (tmp_path / "ca.crt").read_bytes()
    refused = subprocess.run(make, capture_output=True, text=True)
    assert refused.returncode == 2 and "server.key exists; move it away first to renew it" in refused.stderr
    old = (tmp_path / "server.pem").read_bytes()
    for name in ("server.pem", "server.key"):
        (tmp_path / name).rename(tmp_path / f"{name}.old")
    subprocess.run(make, check=True, capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() == ca and (tmp_path / "server.pem").read_bytes() != old
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    for name in ("server.pem", "server.key"):  # a CA that expires before the new certificate would is not reused
        (tmp_path / name).unlink()
    short = subprocess.run(make, capture_output=True, text=True, env={**os.environ, "CERT_DAYS": "5000"})
    assert short.returncode == 2 and "ca.crt expires before a new 5000-day server certificate" in short.stderr
    assert not (tmp_path / "server.pem").exists()


def test_compose_demo_is_secured_and_keeps_data_read_only():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services, named = compose["services"], set(compose["volumes"])
    link = services.pop("superlink")
    assert link["build"]["dockerfile"] == "deploy/Dockerfile.coordinator"
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(link["command"])
    assert "--insecure" not in link["command"]
    assert {a.split("=")[0] for a in link["command"]} >= {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"}
    assert len(services) == 3
    for name, site in services.items():
        args = dict(a.split("=", 1) for a in site["command"])
        assert site["build"]["dockerfile"] == "deploy/Dockerfile.site" and "--insecure" not in args
        assert {"--root-certificates", "--auth-supernode-private-key"} <= set(args), name
        node = parse_config_args([args["--node-config"]])
        assert set(node) == {"site-id", "data-path", "state-dir", "max-epsilon", "max-total-epsilon", "spend-journal",
                             "peer-keys", "auth-private-key"}, name
        assert set(node) <= set(NODE_CONFIG_KEYS), "keys the ClientApp reads (it refuses others)"
        mounts = {m.group(2): (m.group(1), m.group(3)) for m in map(VOLUME.fullmatch, site["volumes"])}
        assert mounts[node["data-path"]][1] == ":ro", "site data must be mounted read-only"
        assert mounts[node["peer-keys"]] == ("./keys/peers.pub", ":ro"), "the roster of peer keys, read-only"
        assert mounts[node["auth-private-key"]][0] == f"./keys/{name}" and node["auth-private-key"].endswith(args["--auth-supernode-private-key"])
        assert mounts[node["state-dir"]][0] in named, "the accountant needs a persistent named volume"
        journal = Path(node["spend-journal"]).parent
        assert mounts[str(journal)][0] in named - {mounts[node["state-dir"]][0]}, "the journal needs its own volume"
        assert float(node["max-total-epsilon"]) >= float(node["max-epsilon"]), "a lifetime cap the site accepts"
        owned = re.search(r"mkdir -p ([^&]+)&& chown app:app", (DEPLOY / "Dockerfile.site").read_text()).group(1).split()
        assert {node["state-dir"], str(journal)} <= set(owned), "a fresh named volume is writable only on a mount point the image owns"


def test_flower_run_config_lists_every_federated_option_with_its_default():
    flwr_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]
    assert "federations" not in flwr_cfg  # flwr 1.41 would rewrite pyproject.toml on `flwr run`
    defaults = {flag(f.name): f.default for f in dataclasses.fields(RunConfig) if f.name not in ("epochs", "d_steps")}
    assert flwr_cfg["app"]["config"] == {**defaults, "resume-from": ""}  # resume-from: the coordinator's, not a run option


def test_a_deployed_coordinator_continues_the_run_named_by_resume_from(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import server.server_app
    from fedpggan.runs import RunFolder

    saved = RunConfig(dataset="phantom", rounds=7, epsilon=3.0).to_flower()
    (tmp_path / "run.json").write_text(json.dumps({"kind": "federated", "status": "stopped", "config": saved}))
    seen = {}

    class Recorder:  # what FederatedRun would be given
        def __init__(self, grid, cfg, resume=False):
            seen.update(cfg=cfg, resume=resume)

        def run(self):
            pass

    monkeypatch.setattr(server.server_app, "FederatedRun", Recorder)
    app = server.server_app.make_server_app()
    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    with pytest.raises(FedPGGANError, match="no checkpoints found"):  # nothing to continue from yet: one line, nothing started
        app(None, SimpleNamespace(run_config={**defaults, "resume-from": str(tmp_path)}))
    monkeypatch.setattr(RunFolder, "checkpoint_index", lambda self: [{"round": 1, "file": "ckpt.pt"}])
    monkeypatch.setattr(RunFolder, "latest_checkpoint", lambda self, warn=True: (tmp_path / "ckpt.pt", {}))
    with pytest.raises(FedPGGANError, match="with its own configuration; drop rounds from --run-config"):
        app(None, SimpleNamespace(run_config={**defaults, "resume-from": str(tmp_path), "rounds": 99}))
    app(None, SimpleNamespace(run_config={**defaults, "resume-from": str(tmp_path)}))
    assert seen["resume"] and seen["cfg"].out == str(tmp_path)
    assert (seen["cfg"].rounds, seen["cfg"].epsilon) == (7, 3.0)  # the run's own options
    app(None, SimpleNamespace(run_config=defaults))
    assert not seen["resume"] and seen["cfg"].rounds == RunConfig().rounds  # a new run


# --- the site's own budget cap (enforced by the ClientApp) --------------------------------------
def test_site_refuses_runs_over_its_own_budget():
    with pytest.raises(FedPGGANError, match="max-epsilon is 5"):
        check_site_budget({"max-epsilon": 5.0}, RunConfig(epsilon=10.0), 100)
    with pytest.raises(FedPGGANError, match="no DP"):
        check_site_budget({"max-epsilon": 10}, RunConfig(epsilon=math.inf), 100)
    with pytest.raises(FedPGGANError, match="max-delta"):
        check_site_budget({"max-epsilon": 10.0, "max-delta": 1e-6}, RunConfig(epsilon=1.0), 100)
    check_site_budget({"max-epsilon": 10.0, "max-delta": 1e-5}, RunConfig(epsilon=10.0), 100)
    check_site_budget({"max-epsilon": "none"}, RunConfig(epsilon=math.inf), 100)
    with pytest.raises(FedPGGANError, match="no max-epsilon, so it refuses every run"):  # a hand-typed node config dropped it
        check_site_budget({"site-id": "a", "data-path": "/data/site.npz"}, RunConfig(epsilon=1.0), 100)
    with pytest.raises(FedPGGANError, match="node config max-epsilon: option 'epsilon' = 'nan' is not a number"):
        check_site_budget({"max-epsilon": "nan"}, RunConfig(epsilon=10.0), 100)


# --- fedpggan site check ---------------------------------------------------------------------------
def write_ca(path: Path, days: int = 365) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=2)).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def site_toml(tmp_path, monkeypatch):
    """Write a site config (overrides: key -> TOML value text, None drops the line); return its path.
    The Python environment counts as a site's (its import guard installed, as the site image has it)."""
    from client import installed_code_only

    guard = installed_code_only.write_pth(tmp_path)
    monkeypatch.setattr(installed_code_only, "pth_file", lambda: guard)
    write_site_npz(tmp_path / "site.npz", 0)
    write_ca(tmp_path / "ca.crt")
    write_ssh_key(tmp_path / "site.key")

    (tmp_path / "state").mkdir()

    def make(extra_top: str = "", extra_privacy: str = "", **overrides: str | None) -> str:
        values = {"site-id": '"hospital-a"', "data": f'"{tmp_path / "site.npz"}"',
                  "state-dir": f'"{tmp_path / "state"}"', "max-epsilon": "10.0", "max-delta": None, "max-epsilon-if-colluding": None, "peer-keys": None,
                  "address": '"127.0.0.1:8000"', "root-certificates": f'"{tmp_path / "ca.crt"}"',
                  "auth-private-key": f'"{tmp_path / "site.key"}"', "device": None, "image-size": None}
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        line = lambda *keys: "".join(f"{k} = {values[k]}\n" for k in keys if values[k] is not None)  # noqa: E731
        text = (line("site-id", "data", "state-dir", "image-size", "device") + extra_top + "[privacy]\n"
                + line("max-epsilon", "max-delta", "max-epsilon-if-colluding", "peer-keys") + extra_privacy
                + "[superlink]\n" + line("address", "root-certificates", "auth-private-key"))
        (tmp_path / "site.toml").write_text(text)
        return str(tmp_path / "site.toml")

    return make


def site_check(capsys, config: str, *flags: str) -> tuple[int, str, str]:
    code = cli_main(["site", "check", "--config", config, *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_site_check_accepts_a_good_site_and_says_what_leaves(site_toml, capsys, tmp_path):
    code, out, err = site_check(capsys, site_toml())
    # its only warning: a cap per run bounds nothing over the runs the coordinator may start
    assert code == 0 and err.count("\n") == 1 and err.startswith("warning: privacy.max-total-epsilon is not set")
    assert site_check(capsys, site_toml(extra_privacy="max-total-epsilon = 30.0\n"))[2] == ""
    assert "40 images, 2 classes" in out and "will NOT leave this site" in out and "images and labels" in out
    assert re.search(r"^  ecdsa-sha2-nistp384 \S+$", out, re.MULTILINE)  # the key to register
    command = out.split("start the site with:\n", 1)[1].strip()
    node = parse_config_args([re.search(r"--node-config '([^']+)'", command).group(1)])
    assert node == {"site-id": "hospital-a", "data-path": str(tmp_path / "site.npz"),
                    "state-dir": str(tmp_path / "state"), "max-epsilon": 10.0, "device": "auto"}
    assert re.search(r"^  device +(cpu|cuda)", out, re.MULTILINE)


def test_a_site_holding_no_image_of_a_class_joins_with_its_empty_folder(site_toml, capsys, tmp_path):
    """Label skew between hospitals: the class list must match every site's, so the empty folder stays; the holder
    of all a run's data (a simulation, `fedpggan train`) is refused such a class."""
    from PIL import Image

    from conftest import tiny_config
    from simulation.run import prepare

    folder = tmp_path / "images" / "train"
    for label in ("benign", "malignant", "normal"):
        (folder / label).mkdir(parents=True)
    for i in range(6):
        for label in ("benign", "normal"):
            Image.fromarray(np.full((28, 28), 30 * i, np.uint8)).save(folder / label / f"{i}.png")
    code, out, _ = site_check(capsys, site_toml(data=f'"{folder.parent}"'))
    assert code == 0 and "12 images, 3 classes (benign, malignant, normal)" in out
    assert "no images of malignant here (allowed: the other sites' images teach it; keep the empty folder" in out
    with pytest.raises(FedPGGANError, match=r"images: class 'malignant' has no training images .*; add images or remove its folder"):
        prepare(tiny_config(tmp_path / "run", dataset=str(folder.parent), min_per_site=2))
    assert not (tmp_path / "run").exists()


def test_site_check_refuses_an_environment_where_the_coordinators_app_bundle_would_run(site_toml, capsys, tmp_path,
                                                                                     monkeypatch):
    from client import installed_code_only

    monkeypatch.setattr(installed_code_only, "pth_file", lambda: tmp_path / "missing.pth")
    code, out, err = site_check(capsys, site_toml())
    assert code == 2 and "ready to join" not in out and err.count("\n") == 1
    assert "run `python -m client.installed_code_only` once" in err
    assert err.startswith("error: the ClientApp would run the code inside")  # about the environment, not site.toml
    code, out, err = site_check(capsys, site_toml(root_certificates=None), "--insecure")  # a local test: a warning
    assert code == 0 and re.search(r"^  code run +the coordinator's app bundle \(--insecure\)$", out, re.MULTILINE)
    assert "run `python -m client.installed_code_only` once" in err
    code, _, err = site_check(capsys, site_toml(), "--insecure")  # with TLS it is a deployment: no bundle code
    assert code == 2 and "run `python -m client.installed_code_only` once" in err


def test_in_the_site_image_a_state_dir_on_no_mounted_volume_is_refused(site_toml, capsys, tmp_path, monkeypatch):
    """Forgetting `-v ...:/state` would keep the accountant in the container's layer: gone with the container."""
    from client.site import state_dir

    config = site_toml()
    monkeypatch.setenv("FEDPGGAN_STATE_MUST_BE_MOUNTED", "1")
    assert "ENV FEDPGGAN_STATE_MUST_BE_MOUNTED=1" in (DEPLOY / "Dockerfile.site").read_text()
    code, _, err = site_check(capsys, config)
    assert code == 2 and err.count("\n") == 1 and "no volume is mounted there" in err
    with pytest.raises(FedPGGANError, match="no volume is mounted there"):
        state_dir({"site-id": "a", "data-path": "x", "state-dir": str(tmp_path / "state")}, {})
    mounted = tmp_path / "state"
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mounted)
    assert site_check(capsys, config)[0] == 0
    (mounted / "sub").mkdir()
    assert state_dir({"site-id": "a", "data-path": "x", "state-dir": str(mounted / "sub")}, {}) == mounted / "sub"


@pytest.mark.parametrize("given, says", [("relative/state", "a relative path is read against the folder"),
                                         ("{tmp}/typo", "does not exist; a new accountant there would forget"),
                                         ("{tmp}/a_file", "is not a folder; a new accountant there would forget")])
def test_a_site_never_starts_its_accountant_in_a_state_dir_it_did_not_prepare(tmp_path, given, says):
    """site check asks for an existing, absolute state-dir; the ClientApp holds to it too, so a mistyped node
    config cannot start a fresh accountant that has forgotten the site's earlier spend."""
    from client.site import state_dir

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(FedPGGANError, match=says):
        state_dir({"site-id": "a", "data-path": "x", "state-dir": given.format(tmp=tmp_path)}, {})
    assert not (tmp_path / "typo").exists() and not Path("relative").exists()


def test_relative_paths_in_a_site_config_are_read_against_its_own_folder(site_toml, capsys, tmp_path, monkeypatch):
    """A SuperNode started from another directory must find the same state dir (else it would
    start a fresh accountant, and its lifetime caps would forget earlier runs)."""
    config = site_toml(data='"site.npz"', state_dir='"state"', root_certificates='"ca.crt"', auth_private_key='"./site.key"')
    monkeypatch.chdir("/")
    code, out, err = site_check(capsys, config)
    assert code == 0, err
    command = shlex.split(out.split("start the site with:\n", 1)[1].strip())
    node = parse_config_args([command[command.index("--node-config") + 1]])
    assert node["data-path"] == str(tmp_path / "site.npz") and node["state-dir"] == str(tmp_path / "state")
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert command[command.index("--auth-supernode-private-key") + 1] == str(tmp_path / "site.key")


def test_the_node_config_keeps_quotes_and_backslashes_in_a_site_id(site_toml, capsys):
    for toml_value, site_id in ((r'"St. \"Mary\" ward\\1"', 'St. "Mary" ward\\1'), (r'"a\\b c"', "a\\b c")):
        code, out, _ = site_check(capsys, site_toml(site_id=toml_value))
        assert code == 0
        command = shlex.split(out.split("start the site with:\n", 1)[1].strip())
        node = parse_config_args([command[command.index("--node-config") + 1]])  # as the SuperNode reads it
        assert node["site-id"] == site_id and node["max-epsilon"] == 10.0
    code, _, err = site_check(capsys, site_toml(site_id='"St. \\"Mary\'s\\" ward"'))
    assert code == 2 and "holds both kinds of quote" in err


def test_a_sites_cap_on_a_secure_releases_worst_case_reaches_its_node_config(site_toml, capsys):
    code, out, _ = site_check(capsys, site_toml(max_epsilon_if_colluding="20.0"))
    assert code == 0 and "worst case stays at most 20 (max-epsilon-if-colluding)" in out
    command = out.split("start the site with:\n", 1)[1].strip()
    node = parse_config_args([re.search(r"--node-config '([^']+)'", command).group(1)])
    assert node["max-epsilon-if-colluding"] == 20.0 and node["max-epsilon"] == 10.0


def test_a_sites_lifetime_cap_reaches_its_node_config(site_toml, capsys):
    code, out, _ = site_check(capsys, site_toml(extra_privacy="max-total-epsilon = 25.0\nmax-total-delta = 1e-4\n"))
    assert code == 0 and "at most 25 over all runs (max-total-epsilon)" in out
    assert "epsilon 0 of 25 used by 0 run(s), 25 left; delta 0 of 0.0001 used by 0 run(s), 0.0001 left" in out
    assert "per run, at most 0.0001 over all runs (max-total-delta)" in out
    command = out.split("start the site with:\n", 1)[1].strip()
    node = parse_config_args([re.search(r"--node-config '([^']+)'", command).group(1)])
    assert node["max-total-epsilon"] == 25.0 and node["max-total-delta"] == 1e-4


def test_a_sites_spend_journal_is_checked_and_reaches_its_node_config(site_toml, capsys, tmp_path):
    (tmp_path / "other-volume").mkdir()
    journal = tmp_path / "other-volume" / "spend.jsonl"
    caps = f'max-total-epsilon = 25.0\nspend-journal = "{journal}"\n'
    code, out, err = site_check(capsys, site_toml(extra_privacy=caps))
    assert code == 0 and f"{journal}: 0 run(s) recorded" in out
    assert "on the same volume as state-dir" in err  # tmp_path is one volume: warned, not refused
    command = out.split("start the site with:\n", 1)[1].strip()
    assert parse_config_args([re.search(r"--node-config '([^']+)'", command).group(1)])["spend-journal"] == str(journal)
    journal.write_text('{"run": "run-a", "epsilon": 10.0, "delta": 1e-05}\n')  # a run the state dir does not hold
    code, out, err = site_check(capsys, site_toml(extra_privacy=caps))
    assert code == 0 and "1 run(s) recorded" in out and "names run(s) that state-dir lacks (run-a)" in err
    assert "epsilon 10 of 25 used by 1 run(s), 15 left" in out and "less than one run" not in err
    journal.write_text(journal.read_text() + '{"run": "run-b", "epsilon": 10.0, "delta": 1e-05}\n')
    code, out, err = site_check(capsys, site_toml(extra_privacy=caps))  # ready, but warned: a run at max-epsilon won't fit
    assert code == 0 and "5 left" in out and "max-total-epsilon: 5 left, less than one run at this site's max-epsilon 10" in err
    for bad, names in ((f'"{tmp_path / "state" / "spend.jsonl"}"', "lies inside state-dir"),
                       (f'"{tmp_path / "nowhere" / "spend.jsonl"}"', "its folder does not exist or it is not writable")):
        code, _, err = site_check(capsys, site_toml(extra_privacy=f"max-total-epsilon = 25.0\nspend-journal = {bad}\n"))
        assert code == 2 and names in err and err.count("\n") == 1
    journal.write_text("not json\n")
    code, _, err = site_check(capsys, site_toml(extra_privacy=caps))
    assert code == 2 and "line 1: unreadable" in err and "restore the file from backup" in err
    journal.unlink()  # its volume not mounted, after the state dir has written to it: refused, as the site refuses it
    (tmp_path / "state" / ".spend-journal-used").touch()
    code, _, err = site_check(capsys, site_toml(extra_privacy=caps))
    assert code == 2 and "missing, but state dir" in err and "never start it afresh" in err and err.count("\n") == 1


def test_a_sites_roster_of_peer_keys_is_checked_and_reaches_its_node_config(site_toml, capsys, tmp_path):
    write_ssh_key(tmp_path / "other.key")
    lines = [f"{(tmp_path / k).read_text().strip()} {name}\n" for k, name in (("site.pub", "hospital-a"), ("other.pub", "hospital-b"))]
    (tmp_path / "peers.pub").write_text("".join(lines))
    code, out, _ = site_check(capsys, site_toml(peer_keys=f'"{tmp_path / "peers.pub"}"'))
    assert code == 0 and "2 sites (hospital-a, hospital-b); this site is 'hospital-a'" in out
    command = out.split("start the site with:\n", 1)[1].strip()
    node = parse_config_args([re.search(r"--node-config '([^']+)'", command).group(1)])
    assert node["peer-keys"] == str(tmp_path / "peers.pub") and node["auth-private-key"] == str(tmp_path / "site.key")
    (tmp_path / "peers.pub").write_text(lines[1])
    code, out, err = site_check(capsys, site_toml(peer_keys=f'"{tmp_path / "peers.pub"}"'))
    assert code == 2 and "does not list this site's own key" in err and err.count("\n") == 1


@pytest.mark.parametrize(("override", "names"), [
    ({"data": '"/nonexistent/site.npz"'}, "or 'phantom'; set 'data' in "),
    ({"image-size": "30"}, "'image-size' 30 is not supported"),
    ({"peer-keys": '"/nonexistent/peers.pub"'}, "privacy.peer-keys /nonexistent/peers.pub: cannot read"),
    ({"root-certificates": '"/nonexistent/ca.crt"'}, "superlink.root-certificates"),
    ({"root-certificates": None}, "superlink.root-certificates"),
    ({"max-epsilon": "-1.0"}, "privacy.max-epsilon"),
    ({"max-epsilon": '"lots"'}, "privacy.max-epsilon"),
    ({"max-epsilon": "inf"}, "'privacy.max-epsilon' must be a finite number > 0"),  # not read as "none"
    ({"max-epsilon-if-colluding": "inf"}, "privacy.max-epsilon-if-colluding"),
    ({"max-delta": "0.5"}, "privacy.max-delta 0.5 is not below 1/n"),
    ({"max-epsilon-if-colluding": "0"}, "privacy.max-epsilon-if-colluding"),
    ({"max-epsilon-if-colluding": '"high"'}, "privacy.max-epsilon-if-colluding"),
    ({"extra_privacy": "max-total-epsilon = 5.0\n"}, "'privacy.max-total-epsilon' must be a number at least max-epsilon"),
    ({"max-epsilon": '"none"', "extra_privacy": "max-total-epsilon = 50.0\n"}, "'privacy.max-total-epsilon' must be"),
    ({"extra_privacy": "max-total-delta = 1.0\n"}, "'privacy.max-total-delta' must be a number in (0, 1)"),
    ({"max-delta": "1e-5", "extra_privacy": "max-total-delta = 1e-6\n"}, "'privacy.max-total-delta' must be"),
    ({"max-epsilon": '"none"', "extra_privacy": "max-total-delta = 1e-6\n"}, "'privacy.max-total-delta' must be"),
    ({"extra_privacy": "max-total-delta = 0.5\n"}, "privacy.max-total-delta 0.5 is not below 1/n"),
    ({"extra_privacy": 'spend-journal = "/tmp/spend.jsonl"\n'}, "'privacy.spend-journal' must be left out, or set together"),
    ({"site-id": None}, "'site-id' is missing"),
    ({"site-id": '"a\'b\\"c"'}, "holds both kinds of quote"),  # refused before "ready to join" is printed
    ({"auth-private-key": '"/nonexistent/site.key"'}, "superlink.auth-private-key /nonexistent/site.key: no such file; make one"),
    ({"device": '"gpu"'}, "'device' must be one of"),
    ({"extra_privacy": "max-detla = 1e-6\n"}, "unknown key 'max-detla' in [privacy]"),
    ({"extra_top": "image_size = 28\n"}, "unknown key 'image_size' at the top level"),
    ({"extra_top": "max-delta = 1e-6\n"}, "unknown key 'max-delta' at the top level"),
    ({"address": '"coordinator example org"'}, "'superlink.address' must be host:port"),
    ({"address": '"coordinator.example.org"'}, "'superlink.address' must be host:port"),
    ({"address": '"https://coordinator.example.org:8000"'}, "'superlink.address' must be host:port"),
    ({"state-dir": '"/nonexistent/stat"'}, "state-dir /nonexistent/stat: does not exist; create it"),
])
def test_site_check_rejects_a_bad_site_with_one_line(site_toml, capsys, override, names):
    code, out, err = site_check(capsys, site_toml(**override))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err
    assert "--dataset" not in err and "--image-size" not in err  # a site.toml has keys, not flags


def test_a_site_data_named_by_medmnist_name_it_cannot_find_asks_for_its_path(site_toml, capsys, tmp_path, monkeypatch):
    from fedpggan.data import medmnist

    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(medmnist, "fetch", lambda url, dest: (_ for _ in ()).throw(OSError("network is unreachable")))
    code, _, err = site_check(capsys, site_toml(data='"pneumoniamnist"'))
    assert code == 2 and err.count("\n") == 1 and "pneumoniamnist is a MedMNIST name" in err
    assert "set 'data' to the path of the site's own .npz file" in err and "--data-dir" not in err


def test_an_unreadable_node_key_is_a_permission_to_fix_not_a_key_to_replace(site_toml, capsys, monkeypatch):
    """Making a new key, as for a missing one, would lock the site out: the coordinator registered the old one."""
    config = site_toml()
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "site.key" else real(self))
    code, _, err = site_check(capsys, config)
    assert code == 2 and "cannot read (Permission denied); give this user" in err and "ssh-keygen" not in err


def test_site_check_opens_the_data_at_its_image_size(site_toml, capsys):
    code, out, _ = site_check(capsys, site_toml(image_size="32"))
    assert code == 0 and "1x32x32" in out


def test_site_check_refuses_a_gpu_the_site_does_not_have(site_toml, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = site_check(capsys, site_toml(device='"cuda"'))
    assert code == 2 and out == "" and err.count("\n") == 1 and 'site device "cuda"' in err and '"auto"' in err


@pytest.mark.parametrize(("node_config", "client_gpus", "gpu_visible", "expected"), [
    ({"device": "cpu"}, 0.0, True, "cpu"),          # a deployed site's own choice wins
    ({"device": "auto"}, 0.0, True, "cuda"),
    ({"device": "auto"}, 0.0, False, "cpu"),
    ({}, 0.0, True, "cuda"),                        # deployed without the key: auto
    ({"partition-id": 0}, 0.0, True, "cpu"),        # simulated, no GPU share reserved by Ray
    ({"partition-id": 0}, 0.2, True, "cuda"),       # simulated with --client-gpus 0.2
    ({"partition-id": 0}, 0.2, False, "cpu"),
])
def test_site_trains_where_its_config_says(monkeypatch, node_config, client_gpus, gpu_visible, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_visible)
    assert site_device(node_config, RunConfig(client_gpus=client_gpus)).type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda"])
def test_site_device_errors_name_the_setting(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FedPGGANError, match="site config"):
        site_device({"device": name}, RunConfig())


def test_site_check_rejects_an_unwritable_state_dir(site_toml, capsys, tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "taken").write_text("a file, not a folder")
    code, _, err = site_check(capsys, site_toml(state_dir=f'"{tmp_path / "taken"}"'))
    assert code == 2 and err.startswith(f"error: --config {tmp_path / 'site.toml'}: state-dir") and err.count("\n") == 1
    assert "is not a folder; point 'state-dir' in the site config at a folder" in err and "mkdir" not in err
    (tmp_path / "read_only").mkdir()  # a folder the site cannot write to (as root, chmod would not stop the write)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", lambda **_: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    code, _, err = site_check(capsys, site_toml(state_dir=f'"{tmp_path / "read_only"}"'))
    assert code == 2 and err.count("\n") == 1
    assert f"state-dir {tmp_path / 'read_only'}: not writable (Permission denied); mount a persistent, writable volume" in err


def test_site_check_warns_about_no_dp_and_insecure(site_toml, capsys):
    code, _, err = site_check(capsys, site_toml(max_epsilon='"none"', root_certificates=None), "--insecure")
    assert code == 0
    assert "WITHOUT differential privacy" in err and "WITHOUT TLS" in err
