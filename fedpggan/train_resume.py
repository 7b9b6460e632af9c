"""Where an interrupted ``fedpggan train`` run continues (``fedpggan train --resume RUN``).

The ledger on disk, not the checkpoint, says how much privacy was spent: every epoch it records
was trained and stays charged, even one whose weights were lost after the newest verified
checkpoint. The resumed run therefore continues with the epoch after the ledger's last one
(from the newest checkpoint's weights), so its accountant covers every step ever taken and it
takes no more steps than the noise was calibrated for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedpggan.config import RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.privacy.accounting import History, extend_history
from fedpggan.privacy.ledger import PrivacyLedger
from fedpggan.runs import RunFolder, now_iso, refuse_completed, resumed_with
from pggan_model import GeneratorTrainer, load_checkpoint
from pggan_model.checkpoint import set_rng_state


@dataclass
class Resumed:
    run_info: dict[str, Any]
    ledger: PrivacyLedger
    first_epoch: int
    history: History  # the accountant's history so far (release, then every recorded epoch)
    embedding_means: torch.Tensor | None  # the release's class means (the release is never made twice)
    embedding_noise_ratio: float


def restore(run: RunFolder, g_trainer: GeneratorTrainer, release: History, planned: dict[str, float] | None,
            data_sha256: str, cfg: RunConfig) -> Resumed:
    """Load the newest verified checkpoint into ``g_trainer``'s GAN; the ledger, accountant
    history and metrics as of the last recorded epoch. ``release`` is the release's history and
    ``planned`` the mechanism the data and options give now (None without DP): it must be the
    one the ledger registered, or the resumed epochs would spend under another calibration.
    ``data_sha256`` is the training data's content hash: other records than the run began with
    would be trained under an accountant that never counted them (and the release is theirs).
    ``cfg`` is what the resumed run trains with (its paths and device may be new: RESUME_MAY_CHANGE)."""
    info = run.read_run()
    refuse_completed(run.root, info)
    dataset = info.get("dataset")
    recorded_data = dataset.get("sha256") if isinstance(dataset, dict) else None
    if recorded_data is not None and recorded_data != data_sha256:
        raise FedPGGANError(f"{run.root}: the training data differ from those the run began with (their content hash "
                            "changed); resume with the run's own data (--dataset/--data-dir) or start a new run")
    recorded = run.read_verified_ledger(info, "a resume")  # never build on an edited or lost spend record
    path, entry = run.latest_checkpoint()
    payload = load_checkpoint(path, g_trainer.gan)
    if "embedding_means" not in payload:
        raise FedPGGANError(f"{path}: written before `fedpggan train --resume` existed, so it lacks what a resume needs; "
                            "start a new run")
    g_trainer.load_state_dict(payload["generator_optim"])
    set_rng_state(payload["rng"])
    ledger = PrivacyLedger.load(recorded)
    # newer checkpoints the ledger lists that latest_checkpoint skipped: missing or failing their hash
    broken = [c["round"] for c in ledger.data["checkpoints"] if c["round"] > entry["round"]]
    registered = ledger.data["sites"].get("central", {})
    for key, now in (planned or {}).items():
        if not math.isclose(float(registered.get(key, math.nan)), float(now), rel_tol=1e-9):
            raise FedPGGANError(f"{run.root}: {key} would be {now:.6g} now but the run's ledger registered "
                                f"{registered.get(key)}: the training data or run.json changed since the run started; "
                                "resume with the run's own data and options, or start a new run")
    history, last = list(release), int(entry["round"])
    for site in ledger.data["sites"].values():
        for r in site["rounds"]:
            history = extend_history(history, r["noise_multiplier"], r["sample_rate"], r["steps"])
            last = max(last, int(r["round"]))
    if last > entry["round"]:
        lost = f"epoch {last}" if last == entry["round"] + 1 else f"epochs {entry['round'] + 1}-{last}"
        print(f"warning: {lost}: trained after the newest verified checkpoint, weights lost; the privacy spend "
              f"stays charged, so training continues at epoch {last + 1} from epoch {entry['round']}'s weights")
    run.keep_metrics_through(last, "epoch")
    info.update(status="running", resumed_at=now_iso(), resumed_from_epoch=entry["round"], resumed_with=resumed_with(cfg, info))
    for round_num in broken:  # in the ledger first, so that an interrupted resume leaves nothing unexplained
        ledger.discard_checkpoint(round_num, f"missing or failing its hash at the resume of {info['resumed_at']}")
    run.save_ledger(ledger, info)
    run.discard_checkpoints_after(entry["round"])
    if last >= cfg.epochs:
        print(f"warning: no epoch is left to train: the run completes with epoch {entry['round']}'s weights "
              "(an export's datasheet says so)")
    else:
        print(f"resuming {run.root} at epoch {last + 1} (weights of {path.name})")
    ratio = info.get("embedding_noise_ratio")
    return Resumed(info, ledger, last + 1, history, payload["embedding_means"], math.inf if ratio is None else ratio)
