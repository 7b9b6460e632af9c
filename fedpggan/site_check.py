"""The checks ``fedpggan site check`` runs before a hospital joins a federation.

Each check returns a line for the report or raises :class:`FedPGGANError` with one line;
problems that do not block joining (a certificate that expires soon, a site that accepts
runs without DP) are returned as warnings.
"""

from __future__ import annotations

import math
import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

from fedpggan.data import ImageDataset, open_dataset
from fedpggan.data.medmnist import MEDMNIST, search_dirs
from fedpggan.errors import FedPGGANError
from fedpggan.preflight import check_image_size
from fedpggan.privacy.lifetime import check_journal_present, merge_budgets, passes_cap, read_spend_journal, reserved_budgets
from fedpggan.privacy.peer_keys import load_peer_signing, load_signing_key, openssh_public
from fedpggan.site_config import SiteConfig, check_persistent, site_torch_device

EXPIRY_WARNING = timedelta(days=30)

# What the ClientApp sends (client/client_app.py, fedpggan/wire.py) and what it never sends.
LEAVES = ("discriminator weights after DP-SGD (per-sample clipped, Gaussian noise added)",
          "privacy spend per round: epsilon, delta, noise multiplier, sample rate, steps",
          "one DP release of per-class mean image embeddings (noised, counted in epsilon); in a secure release "
          "instead a one-run public key (signed with the node key when peer-keys is set), the masked share with the "
          "hash of its self-mask seed, the N it was made for and the peers whose key signatures it checked, and, once "
          "every site's masked share is in, that seed (it removes the self-mask from the sum, not the pairwise masks)",
          "public facts: site id, number of images, image size, channels, class names, dataset name (its MedMNIST name or 'site data')",
          "how long the site's round took (the coordinator sees the reply's arrival time anyway)",
          "why a run was refused or failed, with this site's paths replaced by their node-config keys and "
          "without naming its other studies")
STAYS = ("images and labels", "un-noised per-class counts, losses or accuracies on real images",
         "the data path and the state directory (the accountant history and the secret noise key)")


def check_data(site: SiteConfig) -> tuple[ImageDataset, str]:
    """Open the site's training images with the ClientApp's loader (loader errors are one line), at
    ``image-size`` when given, which must be a size training can build the model for; without it as
    a run with the default --image-size would (an npz at its stored size, an ImageFolder at 28 px)."""
    if site.image_size is not None:
        check_image_size(site.image_size, f"--config {site.path}: 'image-size'")
    try:
        data = open_dataset(site.data, "train", None, site.image_size, named_by=f"'data' in {site.path}")
    except FedPGGANError:
        name, folders = site.data.lower(), search_dirs(None)
        if name not in MEDMNIST or any(any(folder.glob(f"{name}*.npz")) for folder in folders):
            raise  # a file that is there but unusable: its own error names it
        raise FedPGGANError(f"'data' in {site.path}: {site.data} is a MedMNIST name, and no {name}.npz is in "
                            f"{', '.join(map(str, folders))}; set 'data' to the path of the site's own .npz file or "
                            "image folder") from None
    kind = "" if data.is_medical else " -- NOT medical data"
    if data.stored_size != data.image_size:
        kind += f" (stored at {data.stored_size}x{data.stored_size}, resized)"
    if empty := [name for name, n in zip(data.class_names, data.class_counts()) if n == 0]:
        kind += (f"; no images of {', '.join(empty)} here (allowed: the other sites' images teach "
                 f"{'it' if len(empty) == 1 else 'them'}; keep the empty folder, so every site lists the same classes)")
    return data, (f"{site.data}: {len(data)} images, {data.num_classes} classes ({', '.join(data.class_names)}), "
                  f"{data.channels}x{data.image_size}x{data.image_size}{kind}")


def check_device(site: SiteConfig) -> str:
    """Where the site will train D (``device`` in the site config)."""
    device = site_torch_device(site.device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu" + (" (no CUDA GPU visible; device = \"auto\")" if site.device == "auto" else "")


def check_budget(site: SiteConfig, num_records: int) -> tuple[str, list[str]]:
    """The site's cap on what a run may spend; delta must stay below 1/n to mean anything."""
    warnings = []
    if math.isinf(site.max_epsilon):
        warnings.append(f"{site.path}: privacy.max-epsilon = \"none\": this site also trains WITHOUT differential "
                        "privacy if the coordinator asks; set a number (e.g. 10) unless that is intended")
    if site.max_delta is not None and site.max_delta >= 1 / num_records:
        raise FedPGGANError(f"--config {site.path}: privacy.max-delta {site.max_delta:g} is not below 1/n = "
                            f"{1 / num_records:.3g} for {num_records} images; use e.g. {0.1 / num_records:.1g}")
    if site.max_total_delta is not None and site.max_total_delta >= 1 / num_records:
        raise FedPGGANError(f"--config {site.path}: privacy.max-total-delta {site.max_total_delta:g} is not below 1/n = "
                            f"{1 / num_records:.3g} for {num_records} images (a total that large allows a record to leak "
                            f"outright); use e.g. {0.5 / num_records:.1g}")
    eps = "none (no DP cap)" if math.isinf(site.max_epsilon) else f"{site.max_epsilon:g}"
    delta = f"{site.max_delta:g}" if site.max_delta is not None else "the run's (default min(1e-5, 1/(10 n)))"
    colluding = site.max_epsilon_if_colluding
    secure = (f"; secure releases while the worst case stays at most {colluding:g} (max-epsilon-if-colluding)"
              if colluding is not None else "")
    total = (f"; at most {site.max_total_epsilon:g} over all runs (max-total-epsilon)" if site.max_total_epsilon is not None
             else "; no cap over all runs (max-total-epsilon)")
    total_delta = (f", at most {site.max_total_delta:g} over all runs (max-total-delta)"
                   if site.max_total_delta is not None else "")
    return f"max epsilon {eps} per run{total}, delta {delta} per run{total_delta}; 1/n = {1 / num_records:.3g}{secure}", warnings


def check_state_dir(path: Path) -> str:
    """The accountant must persist across restarts, so the directory must exist and be writable now.

    It is not created here: a mistyped path would otherwise become a fresh, empty accountant."""
    if path.exists() and not path.is_dir():
        raise FedPGGANError(f"state-dir {path}: is not a folder; point 'state-dir' in the site config at a folder on a "
                            "persistent, writable volume, then run 'fedpggan site check' again")
    if not path.is_dir():
        raise FedPGGANError(f"state-dir {path}: does not exist; create it on a persistent, writable volume (mkdir -p "
                            f"{path}) or fix 'state-dir' in the site config, then run 'fedpggan site check' again")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise FedPGGANError(f"state-dir {path}: not writable ({exc.strerror}); mount a persistent, writable "
                            "volume there (never a temporary one: it holds the site's privacy spend)") from None
    check_persistent(path, "state-dir")
    runs = sorted(p.parent.name for p in path.glob("*/site_state.json"))
    return f"{path}: writable, {len(runs)} earlier run(s) recorded" + (f" ({', '.join(runs)})" if runs else "")


def check_spend_journal(site: SiteConfig) -> tuple[str, list[str]]:
    """The copy of the lifetime reservations outside ``state-dir``: never inside it (a restore of the
    state dir would roll it back too), its folder writable now, its lines readable; runs it names
    that the state dir lacks are reported (they still count towards the lifetime caps)."""
    journal = site.spend_journal
    if journal is None:
        return "none: a state dir restored from an older backup forgets the runs made since (privacy.spend-journal)", []
    if journal.resolve().is_relative_to(site.state_dir.resolve()):
        raise FedPGGANError(f"privacy.spend-journal {journal} lies inside state-dir {site.state_dir}: restoring the state "
                            "dir from a backup would roll it back too; put it on another volume")
    if not journal.parent.is_dir() or not os.access(journal.parent, os.W_OK) or (journal.exists() and not os.access(journal, os.W_OK)):
        raise FedPGGANError(f"privacy.spend-journal {journal}: its folder does not exist or it is not writable; create "
                            f"{journal.parent} on a persistent volume other than state-dir's, or fix the path in {site.path}")
    check_persistent(journal.parent, "privacy.spend-journal's folder")
    check_journal_present(journal, site.state_dir)
    recorded = read_spend_journal(journal)
    warnings = []
    if site.state_dir.is_dir() and os.stat(journal.parent).st_dev == os.stat(site.state_dir).st_dev:
        warnings.append(f"privacy.spend-journal {journal} is on the same volume as state-dir: restoring that volume "
                        "from a backup would roll both back; keep it on another one")
    missing = sorted(set(recorded) - {p.parent.name for p in site.state_dir.glob("*/site_state.json")})
    if missing:
        warnings.append(f"privacy.spend-journal names run(s) that state-dir lacks ({', '.join(missing)}): was state-dir "
                        "restored from an older backup? They still count towards the lifetime caps")
    return f"{journal}: {len(recorded)} run(s) recorded", warnings


def check_lifetime_left(site: SiteConfig) -> tuple[str, list[str]]:
    """What the lifetime caps leave for new runs, counted as the site will count it (the state
    dir and the spend journal); a site that would refuse a run at its own max-epsilon is warned."""
    caps = {"epsilon": site.max_total_epsilon, "delta": site.max_total_delta}
    if caps["epsilon"] is None:
        no_cap = ("privacy.max-total-epsilon is not set: max-epsilon caps each run, but the coordinator names the runs and "
                  "each new run id starts from nothing, so nothing bounds what all runs on these records spend together")
        if caps["delta"] is None:
            return "no lifetime cap", [no_cap]
    else:
        no_cap = None
    journal = {} if site.spend_journal is None else read_spend_journal(site.spend_journal)
    budgets = merge_budgets(reserved_budgets(site.state_dir), journal)
    parts, warnings = [], []
    for i, (name, cap) in enumerate(caps.items()):
        if cap is None:
            continue
        used = sum(budget[i] for budget in budgets.values())
        parts.append(f"{name} {used:g} of {cap:g} used by {len(budgets)} run(s), {max(cap - used, 0.0):g} left")
        per_run = site.max_epsilon if name == "epsilon" else site.max_delta
        if per_run is not None and passes_cap(used, per_run, cap):
            warnings.append(f"privacy.max-total-{name}: {max(cap - used, 0.0):g} left, less than one run at this site's "
                            f"max-{name} {per_run:g}; such a run will be refused: raise max-total-{name} knowingly, or "
                            f"accept only runs with a smaller {name}")
    return "; ".join(parts), warnings + ([no_cap] if no_cap else [])


def check_ca_certificate(path: Path) -> tuple[str, list[str]]:
    """The CA the site trusts for the SuperLink: present, PEM, not expired."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise FedPGGANError(f"superlink.root-certificates {path}: cannot read ({exc.strerror}); copy the "
                            "coordinator's ca.crt there") from None
    except ValueError:
        raise FedPGGANError(f"superlink.root-certificates {path}: not a PEM certificate; use the coordinator's "
                            "ca.crt (made by deploy/make-certs.sh)") from None
    now, warnings, names = datetime.now(timezone.utc), [], []
    for cert in certs:
        name = cert.subject.rfc4514_string()
        if cert.not_valid_after_utc < now:
            raise FedPGGANError(f"superlink.root-certificates {path}: '{name}' expired on "
                                f"{cert.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for a new ca.crt")
        if cert.not_valid_after_utc < now + EXPIRY_WARNING:
            warnings.append(f"{path}: '{name}' expires on {cert.not_valid_after_utc:%Y-%m-%d}")
        names.append(f"'{name}' valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return f"{path}: {', '.join(names)}", warnings


def check_code_guard(insecure: bool) -> tuple[str, list[str]]:
    """Whether this Python environment loads client/installed_code_only.py at start-up (its .pth file):
    without it, the ClientApp the SuperNode starts is the code in the coordinator's app bundle, so every
    protection the site keeps is the coordinator's to change. Refused, except in an --insecure local test."""
    from client.installed_code_only import PTH_LINE, pth_file

    path = pth_file()
    if path.is_file() and path.read_text() == PTH_LINE:
        return f"this site's installed fedpggan ({path.name}: an app bundle's code is never imported)", []
    problem = ("the ClientApp would run the code inside the coordinator's app bundle (Flower puts it first on sys.path), "
               "so the site's protections would be the coordinator's to change: run `python -m client.installed_code_only` "
               "once in this environment (the site image does)")
    if not insecure:
        raise FedPGGANError(problem)
    return "the coordinator's app bundle (--insecure)", [problem]


def check_private_key(path: Path) -> str:
    """The SuperNode's authentication key: an OpenSSH EC key, as flower-supernode requires.

    Returns the public key line the coordinator must register (``flwr supernode register``)."""
    return openssh_public(load_signing_key(path).public_key()).decode()


def check_peer_keys(site: SiteConfig) -> str:
    """The roster a secure release's key list is checked against: readable, and listing this site."""
    if site.peer_keys is None:
        return "none: in a secure release this site takes the coordinator's key list on trust"
    signing = load_peer_signing(site.peer_keys, site.auth_private_key)
    names = sorted(signing.roster.values())
    return f"{site.peer_keys}: {len(names)} sites ({', '.join(names)}); this site is {signing.own_name!r}"
