"""Every run option, in one place: defaults, help, types, validation, TOML and Flower I/O.

The CLI flags, the ``--config`` TOML file and Flower's ``run_config`` all map onto
:class:`RunConfig`; precedence is defaults < TOML file < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpggan.errors import FedPGGANError

# The random features are pixels x 2 x frequencies floats on every site and the server: 20 000 frequencies
# at 64x64 RGB are 2 GB, beyond which a run fails on memory, not on an error message.
MAX_EMBEDDING_FREQUENCIES = 20_000

# Choices other modules also iterate over, defined once here (this module imports no torch).
GRAD_SAMPLE_MODES = ("bookkeeping", "hooks", "functorch", "ghost")  # ours, then Opacus'
FAKE_GRADIENTS = ("clipped", "exact")
AGGREGATIONS = ("fedavg", "weighted", "median", "trimmed-mean")
# pggan_model.losses.LOSS_RULES: the model library imports nothing of fedpggan, so a test keeps the two equal
LOSS_RULES = ("average", "mean", "single")


def opt(default: Any, help: str, choices: tuple | None = None, group: str = "run") -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@dataclass
class RunConfig:
    # --- data ------------------------------------------------------------------------
    dataset: str = opt("auto", "MedMNIST name (pneumoniamnist, breastmnist, ...), path to an .npz, an ImageFolder directory, or 'phantom' (offline, not medical data); 'auto' = pneumoniamnist when found, else phantom with a warning", group="data")
    data_dir: str = opt("", "folder holding MedMNIST .npz files (else $MEDMNIST_ROOT, ~/.medmnist)", group="data")
    image_size: int = opt(28, "image size to train at (28, 32, 64, ...); data are resized if needed", group="data")
    partition: str = opt("iid", "how records are split into sites", ("iid", "dirichlet", "quantity"), group="data")
    alpha: float = opt(0.5, "Dirichlet concentration for --partition dirichlet/quantity (smaller = more skew)", group="data")
    min_per_site: int = opt(20, "fewest records any site may hold", group="data")
    class_prior: str = opt("uniform", "public class prior for fake labels: 'uniform' or comma-separated weights, e.g. '0.3,0.7'", group="data")
    # --- federation ------------------------------------------------------------------
    clients: int = opt(5, "number of simulated sites", group="federation")
    rounds: int = opt(100, "federated rounds", group="federation")
    fraction: float = opt(1.0, "fraction of sites selected each round", group="federation")
    min_clients: int = opt(0, "fewest valid replies a round needs (0 = half the selected sites, rounded up)", group="federation")
    local_steps: int = opt(8, "DP-SGD steps on D at each site per round", group="federation")
    g_steps: int = opt(0, "generator steps on the server per round; 0 = by the averaged discriminator's DP noise: 8 where it is low (without DP, or e.g. PneumoniaMNIST's 5 sites at epsilon 10), 2 where it is high (epsilon 1, small sites), since the generators otherwise learn that noise; the run prints and records its choice (2 at every budget in runs before 2026-12-06)", group="federation")
    generator_training: str = opt("server", "where G1/G2 learn: 'server' (default) or 'local' at each site, then averaged", ("server", "local"), group="federation")
    aggregation: str = opt("fedavg", "how D updates are combined: 'fedavg' (equal weights), 'weighted' (each site's public record count: under DP a small site's noisy D counts for less), 'median', 'trimmed-mean' (robust to a hostile site)", AGGREGATIONS, group="federation")
    round_timeout: float = opt(600.0, "seconds to wait for a round's replies", group="federation")
    sample_every: int = opt(25, "write a sample grid every N rounds (and at the end)", group="federation")
    checkpoint_every: int = opt(1, "write a checkpoint every N rounds/epochs (and at the end); with 1, --resume loses no work", group="federation")
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep", group="federation")
    client_cpus: float = opt(1.0, "CPU cores per simulated site", group="federation")
    client_gpus: float = opt(0.0, "GPU share per simulated site (e.g. 0.2 lets 5 sites share one GPU)", group="federation")
    # --- centralised trainer ---------------------------------------------------------
    epochs: int = opt(20, "centralised training: passes over the data", group="centralised")
    d_steps: int = opt(5, "centralised training: D steps per generator step", group="centralised")
    # --- optimisation ----------------------------------------------------------------
    batch_size: int = opt(64, "expected real batch per D step (Poisson sampling under DP); also the fake batch size", group="optimisation")
    g_batch_size: int = opt(128, "batch per generator step", group="optimisation")
    lr_d: float = opt(2e-4, "discriminator learning rate (Adam)", group="optimisation")
    lr_g: float = opt(2e-4, "generator learning rate (Adam)", group="optimisation")
    ema_decay: float = opt(0.995, "EMA decay of the sampling generators", group="optimisation")
    loss_rule: str = opt("average", "generator loss rule", LOSS_RULES, group="optimisation")
    latent_dim: int = opt(64, "generator latent size", group="optimisation")
    g_width: int = opt(32, "generator base width", group="optimisation")
    d_width: int = opt(32, "discriminator base width", group="optimisation")
    d_spectral_norm: bool = opt(False, "spectral norm in D (the SNGAN-style baseline; impossible with DP: Opacus cannot train it)", group="optimisation")
    embedding_weight: float = opt(50.0, "weight of the auxiliary class-mean-embedding loss of the generators (0 = off); its target is each site's one-shot DP release (DP-MERF style)", group="optimisation")
    embedding_frequencies: int = opt(500, "random Fourier frequencies of the mean embedding", group="optimisation")
    embedding_blur: float = opt(0.0, "Gaussian blur (pixels) of the random frequencies, so the embedding reads image structure rather than pixel noise (0 = white frequencies)", group="optimisation")
    embedding_count_share: float = opt(0.1, "share of each record's unit norm (squared) in the embedding release that carries its class count; the rest carries its features (0.5 in runs before 2026-12-01)", group="optimisation")
    embedding_steps: int = opt(3, "generator steps on the embedding loss alone per adversarial generator step, taken after a round's adversarial steps (post-processing of the release: no privacy cost); only while the release is clean enough (--embedding-noise-limit): fitting a noisy target harder learns its noise (0 in runs before 2026-12-01)", group="optimisation")
    embedding_noise_limit: float = opt(1.0, "--embedding-steps are taken only while, for every class, the pooled release's estimated noise of its mean is at most this fraction of the distance to the nearest other class mean (0 = never, inf = always; 0.5 in runs before 2026-12-03)", group="optimisation")
    embedding_share: float = opt(0.5, "share of each site's epsilon the embedding release alone would cost (composition makes the total cost far smaller)", group="privacy")
    release_aggregation: str = opt("plain", "how the sites' embedding releases reach the server: 'plain' (each release carries the full noise) or 'secure' (the server sees only their sum, pairwise-masked, so each site adds 1/sqrt(N) of the noise: sqrt(N) times less noise in the pool; assumes the server follows the protocol and does not collude with the other sites)", ("plain", "secure"), group="privacy")
    # --- privacy ---------------------------------------------------------------------
    epsilon: float = opt(10.0, "per-site privacy budget epsilon; 'none' trains without DP", group="privacy")
    delta: float = opt(0.0, "per-site delta (0 = min(1e-5, 1/(10 n_site)))", group="privacy")
    max_grad_norm: float = opt(1.0, "per-sample gradient clipping norm C", group="privacy")
    accountant: str = opt("prv", "Opacus accountant", ("prv", "rdp"), group="privacy")
    grad_sample_mode: str = opt("bookkeeping", "how per-sample gradients are clipped: 'bookkeeping' (the same clipped sum as Opacus' in one pass, without storing a gradient per record: faster; Opacus accounts) or an Opacus mode (hooks, the default until 2026-12-04; functorch; ghost)", GRAD_SAMPLE_MODES, group="privacy")
    fake_gradients: str = opt("exact", "D's gradient on fakes under DP: 'exact' (fakes in a plain pass, neither clipped nor noised: post-processing, and only real rows pay for per-sample gradients) or 'clipped' (one pass, fakes clipped per sample with the real rows; the default before 2026-11-23)", FAKE_GRADIENTS, group="privacy")
    noise_key: str = opt("secret", "where DP noise comes from: 'secret' (a fresh secret key per site, expanded by AES-256-CTR: nobody else can regenerate the noise) or 'seed' (PyTorch's generator seeded from --seed, as simulated and centralised runs drew before 2026-12-04: reproducible, but anyone who knows the seed can regenerate the noise, so the guarantee does not hold against them; for benchmarks only, and refused by deployed sites for a new run)", ("secret", "seed"), group="privacy")
    # --- run -------------------------------------------------------------------------
    device: str = opt("auto", "where to train", ("auto", "cpu", "cuda"))
    seed: int = opt(0, "random seed (runs without DP, or with --noise-key seed, are deterministic for a seed on CPU)")
    out: str = opt("", "run folder (default runs/<timestamp>)")

    @property
    def dp(self) -> bool:
        return not math.isinf(self.epsilon)

    def validate(self) -> "RunConfig":
        """Check ranges; each failure is one line naming the option and a valid value."""
        for f in fields(self):  # inf is a value only where an option gives it a meaning
            value = getattr(self, f.name)
            if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and f.name not in ("epsilon", "embedding_noise_limit"))):
                raise FedPGGANError(f"--{flag(f.name)} {value} is invalid: it must be a finite number")
        if not 0 <= self.seed < 2 ** 63:
            raise FedPGGANError(f"--seed {self.seed} is invalid: it must be in 0 .. 2**63 - 1")
        positive = ("clients", "rounds", "local_steps", "batch_size", "g_batch_size", "epochs", "d_steps",
                    "image_size", "latent_dim", "g_width", "d_width", "sample_every", "checkpoint_every",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise FedPGGANError(f"--{flag(name)} {getattr(self, name)} is invalid: it must be >= 1")
        for name in ("g_steps", "min_clients", "min_per_site", "client_gpus", "delta", "embedding_weight", "embedding_steps",
                     "embedding_noise_limit"):
            if getattr(self, name) < 0:
                raise FedPGGANError(f"--{flag(name)} {getattr(self, name)} is invalid: it must be >= 0")
        for name in ("alpha", "lr_d", "lr_g", "max_grad_norm", "epsilon", "round_timeout", "client_cpus"):
            value = getattr(self, name)
            if not value > 0:
                raise FedPGGANError(f"--{flag(name)} {value} is invalid: it must be > 0")
        if not 0 < self.embedding_count_share < 1:
            raise FedPGGANError(f"--embedding-count-share {self.embedding_count_share} is invalid: it must be in (0, 1)")
        if not 0 < self.embedding_share < 1:
            raise FedPGGANError(f"--embedding-share {self.embedding_share} is invalid: it must be in (0, 1)")
        if not 0 <= self.embedding_blur <= 8:
            raise FedPGGANError(f"--embedding-blur {self.embedding_blur} is invalid: it must be in [0, 8] pixels")
        if not 1 <= self.embedding_frequencies <= MAX_EMBEDDING_FREQUENCIES:  # the features are pixels x 2 x frequencies floats
            raise FedPGGANError(f"--embedding-frequencies {self.embedding_frequencies} is invalid: it must be in 1 .. "
                                f"{MAX_EMBEDDING_FREQUENCIES} (default 500)")
        for name in ("lr_d", "lr_g"):  # Adam steps of more than the weights' own scale only diverge
            if getattr(self, name) > 1:
                raise FedPGGANError(f"--{flag(name)} {getattr(self, name)} is invalid: it must be at most 1 (default 2e-4)")
        if not 0 < self.fraction <= 1:
            raise FedPGGANError(f"--fraction {self.fraction} is invalid: it must be in (0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise FedPGGANError(f"--ema-decay {self.ema_decay} is invalid: it must be in [0, 1)")
        if self.delta >= 1:
            raise FedPGGANError(f"--delta {self.delta} is invalid: it must be < 1 (typically 1e-5)")
        if self.min_clients > self.clients:
            raise FedPGGANError(f"--min-clients {self.min_clients} exceeds --clients {self.clients}")
        if self.min_clients > (selected := sites_per_round(self.fraction, self.clients)):
            raise FedPGGANError(f"--min-clients {self.min_clients} exceeds the {selected} site(s) that --fraction "
                                f"{self.fraction:g} selects of --clients {self.clients}: no round could succeed; lower "
                                "--min-clients or raise --fraction")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise FedPGGANError(f"--{flag(f.name)} {getattr(self, f.name)!r} is invalid: choose one of {', '.join(choices)}")
        if self.d_spectral_norm and self.dp:
            raise FedPGGANError("--d-spectral-norm needs --epsilon none: Opacus cannot train spectral norm")
        class_prior(self.class_prior)  # raises on a malformed prior
        return self

    def generator_steps(self, d_noise: float) -> int:
        """Generator steps per round: --g-steps, or for 0 the measured choice by ``d_noise``, the noise of
        the averaged discriminator's per-step gradient (fedpggan.privacy.mechanism.averaged_d_noise)."""
        if self.g_steps:
            return self.g_steps
        return AUTO_G_STEPS["low noise" if d_noise <= AUTO_G_STEPS_MAX_NOISE else "high noise"]

    def embedding_steps_at(self, noise_ratio: float) -> int:
        """Embedding-only steps per adversarial generator step for a release of this estimated
        noise ratio (pggan_model.mean_embedding.release_noise_ratio): none above the limit."""
        return self.embedding_steps if noise_ratio <= self.embedding_noise_limit else 0

    # --- Flower run_config (kebab-case keys, scalar values) -----------------------------
    def to_flower(self) -> dict[str, Any]:
        return {flag(k): ("none" if k == "epsilon" and not self.dp else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> "RunConfig":
        values = {k.replace("-", "_"): v for k, v in run_config.items()}
        return cls.from_dict(values, source="Flower run_config")

    @classmethod
    def from_saved(cls, run_config: dict[str, Any]) -> "RunConfig":
        """The configuration a saved run (run.json) trained with: an option it does not name
        held the default of its day, which for a changed default is not today's."""
        return cls.from_flower({**SAVED_BEFORE_DEFAULT_CHANGED, **run_config})

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> "RunConfig":
        """Defaults overridden by ``values`` (typed and checked); unknown keys are errors."""
        known = {f.name: f for f in fields(cls)}
        out = cls()
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise FedPGGANError(f"{source}: unknown option '{key}'; see the command's --help for valid names")
            setattr(out, name, coerce(name, value, known[name].default, source))
        return out.validate()


# Options whose default changed, with the value a run saved without them trained with.
SAVED_BEFORE_DEFAULT_CHANGED = {"fake-gradients": "clipped", "embedding-count-share": 0.5, "embedding-steps": 0,
                                "embedding-noise-limit": 0.5, "noise-key": "seed"}

# --g-steps 0: generator steps per round by the averaged discriminator's DP noise (sigma / B of each site's
# DP-SGD step, root mean square over the sites, over sqrt of the sites averaged per round: 0 without DP), as
# measured (docs/quality-findings.md, "Generator steps by noise"): where it is at most 0.008 (PneumoniaMNIST's 5
# sites, an RGB phantom's and Fashion-MNIST's at epsilon 10) 8 steps learn the classes of data with many (RGB
# phantom TSTR AUC 0.81 -> 0.89, Fashion-MNIST 0.915 -> 0.938) and lift PneumoniaMNIST's label fidelity
# (0.91 -> 0.95) at the same AUC; where it is 0.043 or more (BreastMNIST's 3 sites at epsilon 10, PneumoniaMNIST's
# at epsilon 1) they learn D's noise (0.668 -> 0.554 over 5 seeds; 0.869 -> 0.754), and so they do at 0.018 and 0.026
# (PneumoniaMNIST at epsilon 3 and 2, two training seeds each: 0.903 -> 0.876 and 0.891 -> 0.807, the normal class
# unlearned; probes of 2026-12-06, which moved the limit from 0.02). At 0.0125 and 0.0099 (epsilon 5 and 7) both give the
# same AUC (0.906 / 0.901 and 0.905 / 0.903 for 8 / 2 steps), 8 with higher label fidelity and, on one seed, a lower normal recall.
# Just above the limit the data disagree: on the ten-class RGB phantom 8 still help at 0.0139 (lower AUC at 0.0173),
# on PneumoniaMNIST they already hurt at 0.0146 (0.880 against 0.918). At or below 0.012 they never lowered AUC.
AUTO_G_STEPS = {"low noise": 8, "high noise": 2}
AUTO_G_STEPS_MAX_NOISE = 0.012

# How large ``fedpggan evaluate`` is: REPORT is the size figures are quoted at (its defaults), QUICK
# the smoke check of ``--quick``. The report flags an evaluation smaller than REPORT as quick.
EVALUATION_REPORT_SIZE = {"n_synthetic": 5000, "steps": 400, "seeds": 3}
EVALUATION_QUICK_SIZE = {"n_synthetic": 1000, "steps": 100, "seeds": 1}
# Below this TSTR recall a class counts as not learned: a classifier trained on the synthetic images (at its own
# decision) recognises almost none of the real test images of that class (EVALUATION.md and the datasheet say so);
# measured there: 7 of 10 classes of an RGB phantom at epsilon 10 (docs/quality-findings.md)
UNLEARNED_RECALL = 0.1


def sites_per_round(fraction: float, sites: int) -> int:
    """How many of ``sites`` a round with --fraction selects: ceil(fraction x sites), at least one (none of none)."""
    return max(1, math.ceil(fraction * sites)) if sites else 0


def replies_needed(min_clients: int, asked: int) -> int:
    """Valid replies a round (or the secure sum) needs of the ``asked`` sites: --min-clients, or with 0 half of
    them, rounded up, so that one failing site does not stall the run."""
    return min_clients or math.ceil(asked / 2)


def flag(name: str) -> str:
    return name.replace("_", "-")


def coerce(name: str, value: Any, default: Any, source: str) -> Any:
    """Convert ``value`` to the option's type; 'none'/'inf' for epsilon means no DP."""
    if name == "epsilon" and isinstance(value, str) and value.strip().lower() in ("none", "inf", "off"):
        return math.inf
    try:
        if not isinstance(value, (str, int, float)) or (isinstance(value, bool) and not isinstance(default, bool)):
            raise ValueError  # a TOML list or table, or true/false for a number or text
        if isinstance(default, bool):
            words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
            if isinstance(value, str) and value.strip().lower() in words:
                return words[value.strip().lower()]
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            number = float(value)
            if math.isnan(number):
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError):
        expected = ("a number, or 'none' for no DP" if name == "epsilon" else
                    {bool: "true or false", int: "a whole number", float: "a number"}.get(type(default), "text"))
        raise FedPGGANError(f"{source}: option '{flag(name)}' = {value!r} is not {expected}; fix its value") from None


def class_prior(spec: str) -> list[float] | None:
    """Parse --class-prior: None for uniform, else normalised weights (public, user given)."""
    if spec.strip().lower() == "uniform":
        return None
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise FedPGGANError(f"--class-prior {spec!r} is invalid: use 'uniform' or weights like '0.3,0.7'") from None
    if len(weights) < 2 or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise FedPGGANError(f"--class-prior {spec!r} is invalid: give one non-negative weight per class")
    return [w / sum(weights) for w in weights]


def read_toml(path: str | Path, fix: str = "check the path") -> dict[str, Any]:
    """A ``--config`` TOML file as a dict; a missing or invalid file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FedPGGANError(f"--config {path}: file not found; {fix}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedPGGANError(f"--config {path}: invalid TOML ({exc})") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """The options of a flat file, or of its [fedpggan] table (then nothing may stand beside it)."""
    data = read_toml(path)
    if "fedpggan" not in data:
        return data
    if not isinstance(data["fedpggan"], dict) or len(data) > 1:
        raise FedPGGANError(f"--config {path}: put every option either at the top of the file or under one [fedpggan] "
                            f"table, not both (found {', '.join(sorted(data))})")
    return data["fedpggan"]


def add_arguments(parser: argparse.ArgumentParser, names: list[str], defaults: dict[str, Any] | None = None) -> None:
    """Add ``--flag`` options for the named RunConfig fields, grouped as in the dataclass."""
    defaults = defaults or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(RunConfig):
        if f.name not in names:
            continue
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        default = defaults.get(f.name, f.default)
        shown = "none" if isinstance(default, float) and math.isinf(default) else default
        group.add_argument(
            f"--{flag(f.name)}", dest=f.name, default=argparse.SUPPRESS, choices=f.metadata["choices"],
            metavar=None if f.metadata["choices"] else type(f.default).__name__.upper(),  # choices show as {a,b}
            help=f"{f.metadata['help']} (default: {shown!r})",
        )
    parser.add_argument("--config", metavar="FILE", help="TOML file of options (flags override it)")


def resolve(args: argparse.Namespace, names: list[str], defaults: dict[str, Any] | None = None) -> RunConfig:
    """defaults < command defaults < TOML file < flags, then validated."""
    values: dict[str, Any] = dict(defaults or {})
    if getattr(args, "config", None):
        from_file = load_toml(args.config)
        known = {f.name for f in fields(RunConfig)}
        for key in from_file:  # an option of another command would otherwise be ignored without a word
            if key.replace("-", "_") not in known:
                raise FedPGGANError(f"--config {args.config}: unknown option '{key}'; the keys are the option names "
                                    "(see this command's --help)")
            if key.replace("-", "_") not in names:
                raise FedPGGANError(f"--config {args.config}: option '{key}' does not apply to this command; remove it "
                                    "(see this command's --help for its options)")
        values.update(from_file)
    values.update({n: getattr(args, n) for n in names if hasattr(args, n)})
    source = f"command line or --config {args.config}" if getattr(args, "config", None) else "command line"
    return RunConfig.from_dict(values, source=source)
