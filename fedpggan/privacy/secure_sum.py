"""Secure summation of the sites' embedding releases with pairwise masks and self-masks
(Bonawitz et al. 2017's double masking, with a restart among the sites left instead of its
secret-shared dropout recovery).

Why: each site's release is pooled by the server anyway. If the server sees only the pool, each
site needs only 1/sqrt(N) of the noise for the pool to carry the noise one release would: the
pooled release is then sqrt(N) times less noisy (see release_share_noise).

Protocol, three messages per site, before the first round:
1. every site makes a fresh X25519 key pair and sends its public key;
2. the server sends every site all public keys; each site adds to its (fixed-point) noisy
   release one mask per other site, derived from their shared Diffie-Hellman secret, with
   opposite signs on the two sides, plus a self-mask from a fresh secret seed, and sends the
   masked vector. The pairwise masks cancel in the sum (mod 2^64) and nowhere else;
3. once every vector of the attempt is in, each site reveals its self-mask seed, and the server
   removes the self-masks from the sum. A site reveals a seed once per run, never for a second
   attempt.
A site that fails step 1 is left out of the key list. If a site fails step 2, the server starts
again from step 1 with the sites that sent their vectors: fresh keys, and each site adds noise to
its share for the smaller sum (``top_up_noise``), so that the sum still carries one release's noise. Because each site reveals one seed, its share is in
at most one sum the server can unmask, even if the server claims a failure that did not happen
and collects a second sum over other sites: the difference of two sums would isolate shares.
A site that fails step 3 stops the protocol: the sum stays masked, and the sites that revealed
cannot take part in another attempt.

Privacy assumptions (state them to the privacy officer; the ledger records both figures):
- the key list comes from the server. A site with a roster of its peers' SuperNode keys
  (``peer-keys``, fedpggan.privacy.peer_keys) masks only towards keys that distinct peers signed
  for this run, so a server cannot forge them; a site without a roster takes the list on trust,
  and a server that hands it forged keys can unmask its vector;
- the other sites do not collude with the server: a coalition learns the honest sites' sum with
  only their share of the noise; and as the server picks which keys are in a site's list, a server
  that deviates can give a site a list of itself and c colluders and see its share with
  sigma^2 / (c + 1) of noise. A site whose every peer of its list colludes keeps only its own noise
  (sigma / sqrt(N)), the ledger's ``epsilon_if_all_other_sites_collude``. A server that forges
  the key list of a site without a roster gets the same (a site's share seen alone), with an N of
  its choosing (with a roster, N is at most the roster's size): so each site caps that worst case
  itself (its ``max-epsilon-if-colluding``, client/site.py) before it
  makes a share. Topping a share up only adds independent noise, so the least noisy share a site
  sent, sigma / sqrt(N) for the N it was first made for, is still that worst case.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedpggan.errors import FedPGGANError
from fedpggan.privacy.accounting import epsilon_of
from fedpggan.privacy.feature_release import release_entry

SECURE_SUM_ASSUMPTION = ("the embedding releases were summed securely: their part of each site's guarantee assumes the "
                         "server follows the protocol and does not collude with the other sites, and, at a site whose "
                         "feature_release.key_list is not verified, relays the key list honestly (worst case: each site's "
                         "feature_release.epsilon_if_all_other_sites_collude)")
FRACTION_BITS = 24  # fixed point: 2^-24 rounding per entry, post-processing of the noisy release
MASK_INFO = b"fedpggan secure release mask v1"
SELF_MASK_INFO = b"fedpggan secure release self-mask v1"


def release_share_noise(release_sigma: float, num_sites: int) -> float:
    """The noise one site adds so that the sum of ``num_sites`` shares carries ``release_sigma``."""
    return release_sigma / math.sqrt(num_sites)


def top_up_noise(release_sigma: float, made_for: int, num_sites: int) -> float:
    """The noise to add to a share made for a sum over ``made_for`` sites so that it carries its
    part of a sum over ``num_sites`` < ``made_for`` sites: the variances add up to sigma^2 / num_sites."""
    return release_sigma * math.sqrt(1.0 / num_sites - 1.0 / made_for)


def epsilon_if_all_other_sites_collude(release_sigma: float, num_sites: int, dp_sgd: tuple[float, float, int],
                                        delta: float, accountant: str) -> float:
    """A site's epsilon when its share is seen alone: the server colludes with every other site, or
    forges the key list. Only the site's own share of the release noise (sigma / sqrt(N)) and its
    DP-SGD steps ``dp_sgd`` = (noise multiplier, sample rate, steps) protect it then."""
    worst = [release_entry(release_share_noise(release_sigma, num_sites)), dp_sgd]
    return epsilon_of(worst, delta, accountant)


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh key pair per protocol run; the private key never leaves the site."""
    private = X25519PrivateKey.generate()
    return private, public_key_of(private)


def private_key_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_key_from(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_of(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def to_fixed(values: torch.Tensor) -> np.ndarray:
    """Fixed-point uint64 encoding (two's complement) of a float tensor."""
    scaled = np.rint(values.double().numpy() * 2.0**FRACTION_BITS)
    if not np.all(np.isfinite(scaled)):
        raise ValueError("release entries that are not finite numbers (NaN or infinite) cannot enter the secure sum")
    if not np.all(np.abs(scaled) < 2.0**62):
        raise ValueError("release entries too large for the fixed-point encoding of the secure sum")
    return scaled.astype(np.int64).view(np.uint64)


def from_fixed(encoded: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(encoded.astype(np.uint64).view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS)


def pair_mask(private: X25519PrivateKey, peer_public: bytes, size: int) -> np.ndarray:
    """The mask two sites share: SHAKE-256 keyed by their Diffie-Hellman secret (via HKDF)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return mask_stream(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MASK_INFO).derive(shared), size)


def mask_stream(secret: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint64 words of SHAKE-256 of ``secret``: a mask nobody without it can predict."""
    return np.frombuffer(hashlib.shake_256(secret).digest(8 * size), dtype=np.uint64).copy()


def new_self_mask_seed() -> bytes:
    """A fresh secret seed for one attempt's self-mask, revealed at most once."""
    return secrets.token_bytes(32)


def seed_commitment(seed: bytes) -> bytes:
    """Sent with the vector, so that the server can tell a wrong seed at the reveal from a right one."""
    return hashlib.sha256(SELF_MASK_INFO + seed).digest()


def self_mask(seed: bytes, size: int) -> np.ndarray:
    """The mask only the site knows until it reveals ``seed``: SHAKE-256 of the seed."""
    return mask_stream(SELF_MASK_INFO + seed, size)


def check_public_key(raw: bytes) -> None:
    """Raise ValueError unless ``raw`` is an X25519 public key a mask can be agreed with (not a
    low-order point, with which every shared secret is zero)."""
    if len(raw) != 32:
        raise ValueError("a public key of the wrong length")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise ValueError("not a usable X25519 public key (a low-order point)") from None


def check_key_list(own_public: bytes, publics: list[bytes]) -> None:
    """A key list this site can mask towards: its own key once, no key twice (a repeated key would
    cancel a mask that should stay), every key usable. Checked before the share is drawn."""
    if publics.count(own_public) != 1 or len(set(publics)) != len(publics):
        raise FedPGGANError("secure release: the server's key list must hold this site's public key once and no key "
                            "twice; the server must restart the protocol from step 1")
    for i, key in enumerate(publics):
        try:
            check_public_key(key)
        except ValueError as exc:
            raise FedPGGANError(f"secure release: key {i + 1} of the server's key list is {exc}; no share was drawn; "
                                "the server must leave that site out and restart the protocol from step 1") from None


def masked_share(share: torch.Tensor, private: X25519PrivateKey, own_public: bytes, publics: list[bytes],
                 self_seed: bytes) -> np.ndarray:
    """This site's fixed-point ``share`` plus its self-mask and its masks with every other key of
    ``publics`` (added towards larger keys, subtracted towards smaller ones, so each pair cancels)."""
    check_key_list(own_public, publics)
    total = to_fixed(share).ravel()
    total = total + self_mask(self_seed, total.size)  # uint64 arithmetic wraps mod 2^64
    for peer in publics:
        if peer == own_public:
            continue
        mask = pair_mask(private, peer, total.size)
        total = total + mask if own_public < peer else total - mask
    return total


def unmasked_sum(masked: list[np.ndarray], self_seeds: list[bytes], shape: tuple[int, ...]) -> torch.Tensor:
    """The sum of every site's share: the pairwise masks cancel only when all vectors are present,
    and the self-masks come off only with every site's revealed seed."""
    total = np.zeros(math.prod(shape), dtype=np.uint64)
    for vector in masked:
        total = total + vector.astype(np.uint64).ravel()
    for seed in self_seeds:
        total = total - self_mask(seed, total.size)
    return from_fixed(total).reshape(shape)
