"""Signed key lists for the secure release: a server can no longer hand a site forged keys.

Why: the pairwise masks of the secure sum (fedpggan.privacy.secure_sum) hide a site's share only
from someone who does not hold the private half of one of the keys it masks towards. The server
relays the key list, so a server that swaps in keys of its own can unmask any share it likes.

Here each site signs its one-run X25519 key with its SuperNode key (the NIST-curve ECDSA key it
already holds, whose public half the coordinator registered), bound to the run id; every site
checks each entry of the list against a roster of the consortium's public keys that reached it
out of band (``peer-keys``: one OpenSSH public key per line, as in ``authorized_keys``, with the
site's name as the comment). Privacy assumption this buys: the roster is genuine (each hospital
confirmed the fingerprints, as for SuperNode registration) and no roster key is stolen. Then a
share is unmasked only if every other site of the list colludes with the server: the case each
site already caps (``max-epsilon-if-colluding``).
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_private_key, load_ssh_public_key

from fedpggan.errors import FedPGGANError

SIGNED_CONTEXT = b"fedpggan secure release key v1"
HASH_OF_CURVE = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}


@dataclass(frozen=True)
class SignedKey:
    """One entry of the key list: a site's X25519 key, its signer's OpenSSH public key, the signature."""

    public_key: bytes
    signer: bytes
    signature: bytes


def openssh_public(key: ec.EllipticCurvePublicKey) -> bytes:
    """The key as ``ecdsa-sha2-nistp384 AAAA...`` (no comment): how the roster and the wire name a signer."""
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)


@dataclass(frozen=True)
class PeerSigning:
    """What a site needs to sign its key of a secure release and to check everyone else's."""

    roster: dict[bytes, str]
    signing_key: ec.EllipticCurvePrivateKey

    @property
    def own_name(self) -> str:
        return self.roster[openssh_public(self.signing_key.public_key())]


def load_signing_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """The site's SuperNode key (OpenSSH format, NIST curve, as ``flower-supernode`` reads it)."""
    fix = f"make one with ssh-keygen -t ecdsa -b 384 -N '' -f {path} (a new key must be registered with the coordinator again)"
    try:
        key = load_ssh_private_key(Path(path).read_bytes(), None)
    except FileNotFoundError:
        raise FedPGGANError(f"superlink.auth-private-key {path}: no such file; {fix}") from None
    except OSError as exc:  # the key the coordinator registered is there: let this user read it, do not replace it
        raise FedPGGANError(f"superlink.auth-private-key {path}: cannot read ({exc.strerror}); give this user (uid "
                            f"{os.getuid()}; the site image's is 49999) read access to it") from None
    except (ValueError, UnsupportedAlgorithm, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in HASH_OF_CURVE:
        raise FedPGGANError(f"superlink.auth-private-key {path}: not an unencrypted OpenSSH ECDSA key on a NIST curve; {fix}")
    return key


def load_peer_signing(roster_path: str | Path, key_path: str | Path) -> PeerSigning:
    """The roster and the site's own key, which the roster must list (else its peers refuse its key)."""
    roster, key = load_roster(roster_path), load_signing_key(key_path)
    if openssh_public(key.public_key()) not in roster:
        raise FedPGGANError(f"privacy.peer-keys {roster_path} does not list this site's own key ({key_path}); ask the "
                            "coordinator for the current peers.pub, which must hold every site's site.key.pub")
    return PeerSigning(roster, key)


def load_roster(path: str | Path) -> dict[bytes, str]:
    """The consortium's public keys from ``path`` (OpenSSH lines ``type base64 name``): key -> name."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a text file of OpenSSH public keys"
        raise FedPGGANError(f"privacy.peer-keys {path}: cannot read ({why}); ask the coordinator for the "
                            "consortium's peers.pub and set privacy.peer-keys in the site config to it") from None
    roster: dict[bytes, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        try:
            key = load_ssh_public_key(" ".join(parts[:2]).encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise FedPGGANError(f"privacy.peer-keys {path}, line {number}: not an OpenSSH public key ({exc}); "
                                "each line must be a site's site.key.pub") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in HASH_OF_CURVE:
            raise FedPGGANError(f"privacy.peer-keys {path}, line {number}: not a NIST-curve ECDSA key (SuperNode keys are)")
        name = " ".join(parts[2:]) or f"line {number}"
        if openssh_public(key) in roster:
            raise FedPGGANError(f"privacy.peer-keys {path}, line {number}: the key of {name!r} is listed twice")
        roster[openssh_public(key)] = name
    if not roster:
        raise FedPGGANError(f"privacy.peer-keys {path}: holds no public key; it must list every site's site.key.pub")
    return roster


def signed_bytes(run_id: str, public_key: bytes) -> bytes:
    """What a site signs: the key bound to this run, so that a key cannot be moved to another run."""
    run = run_id.encode()
    return SIGNED_CONTEXT + len(run).to_bytes(4, "big") + run + public_key


def sign_key(signing_key: ec.EllipticCurvePrivateKey, run_id: str, public_key: bytes) -> SignedKey:
    signature = signing_key.sign(signed_bytes(run_id, public_key), ec.ECDSA(HASH_OF_CURVE[signing_key.curve.name]()))
    return SignedKey(public_key, openssh_public(signing_key.public_key()), signature)


def verify_key_list(entries: list[SignedKey], roster: dict[bytes, str], run_id: str) -> list[str]:
    """The names of the key list's signers, once each checked: every entry is signed, for this run,
    by a distinct roster key. Any failure refuses the whole list (before a share is drawn)."""
    names = []
    for index, entry in enumerate(entries, 1):
        name = roster.get(entry.signer)
        if name is None:
            raise FedPGGANError(f"secure release: key {index} of the server's key list is not signed by a key in this site's "
                                "peer-keys (unsigned or an unknown signer); no share was drawn. If a site joined, add its "
                                "site.key.pub to peer-keys; if every site is listed, do not take part in this run")
        if name in names:
            raise FedPGGANError(f"secure release: the server's key list holds two keys signed by {name!r}; no share was drawn")
        public = load_ssh_public_key(entry.signer)
        try:
            public.verify(entry.signature, signed_bytes(run_id, entry.public_key), ec.ECDSA(HASH_OF_CURVE[public.curve.name]()))
        except InvalidSignature:
            raise FedPGGANError(f"secure release: the key the server lists for {name!r} does not carry {name!r}'s signature "
                                "for this run (a forged or substituted key); no share was drawn") from None
        names.append(name)
    return names
