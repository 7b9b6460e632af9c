"""What people read: evaluation.json, EVALUATION.md (also printed) and evaluation_grid.png."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedpggan.config import AUTO_G_STEPS, AUTO_G_STEPS_MAX_NOISE, UNLEARNED_RECALL
from fedpggan.io import atomic_write_bytes, atomic_write_json
from fedpggan.plots import plt, save_figure, to_uint8

GRID_PER_CLASS = 8


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def pm(stat: dict[str, Any], i: int | None = None) -> str:
    mean, std = (stat["mean"], stat["std"]) if i is None else (stat["mean"][i], stat["std"][i])
    return "n/a" if fmt(mean) == "n/a" else f"{fmt(mean)} ± {fmt(std)}"


def privacy_unknown(result: dict[str, Any]) -> str:
    """What to print for a run whose ledger states no epsilon: no DP, or no ledger to tell."""
    ledger = result.get("ledger", "verified")  # reports written before the field existed
    return "no DP" if ledger == "verified" else f"unknown (privacy ledger {ledger})"


def markdown(result: dict[str, Any]) -> str:
    """The report as a markdown document of tables."""
    names = result["dataset"]["class_names"]
    eps = result["epsilon"]
    s = result["settings"]
    lines = [
        f"# Evaluation of {result['run']}", "",
        f"Checkpoint `{result['checkpoint']['file']}` (round {result['checkpoint']['round']}), "
        f"epsilon = {fmt(eps, 2) if eps is not None else privacy_unknown(result)}; real data: {result['dataset']['name']} "
        f"({result['dataset']['n_train']} train / {result['dataset']['n_test']} {result['dataset'].get('split', 'test')}); "
        f"generator {s['generator']}, "
        f"{s['n_synthetic']} synthetic images, seeds {s['seeds']}, classifier budget {s['classifier_budget']}.", "",
    ]
    if s.get("quick"):
        lines += [f"**Quick evaluation** (a smoke check: {', '.join(s['short_of_report'])}): not figures to report; "
                  "run `fedpggan evaluate` without --quick or the smaller options.", ""]
    lines += [
        "## Utility (mean ± std over seeds)", "",
        "| metric | TSTR (train synthetic) | TRTR (train real) |", "|---|---|---|",
        f"| ROC AUC | {pm(result['tstr']['auc'])} | {pm(result['trtr']['auc'])} |",
        f"| accuracy | {pm(result['tstr']['accuracy'])} | {pm(result['trtr']['accuracy'])} |",
    ]
    lines += [f"| recall: {name} | {pm(result['tstr']['per_class_recall'], c)} | "
              f"{pm(result['trtr']['per_class_recall'], c)} |" for c, name in enumerate(names)]
    if len(names) == 1:
        lines += ["", "One class: a classifier has nothing to tell apart, so these utility figures are trivial "
                  "(AUC undefined, accuracy 1); judge this run by fidelity and memorisation."]
    lines += unlearned_classes(result)
    p, lf, mem = result["prdc"], result["label_fidelity"], result["memorisation"]
    lines += [
        "", "## Fidelity and diversity (features of a classifier trained on real data)", "",
        "| metric | value | meaning |", "|---|---|---|",
        f"| FID (classifier features) | {fmt(result['fid'])} | 0 = same feature distribution as the real "
        f"{result['dataset'].get('split', 'test')} images |",
        f"| precision | {fmt(p['precision'])} | share of synthetic images on the real manifold |",
        f"| recall | {fmt(p['recall'])} | share of real images reached by the synthetic manifold |",
        f"| density | {fmt(p['density'])} | ~1 when synthetic images are as packed as real ones |",
        f"| coverage | {fmt(p['coverage'])} | share of real neighbourhoods holding a synthetic image |",
        f"| label fidelity | {fmt(lf['overall'])} | real-trained classifier agrees with the requested label "
        f"(its accuracy on real test images: {fmt(lf['real_test_reference'])}) |",
        "", "| class | label fidelity | diversity ratio (synthetic / real spread) |", "|---|---|---|",
    ]
    div = result["diversity"]
    lines += [f"| {name} | {fmt(lf['per_class'][c])} | {fmt(div['ratio'][c])}"
              f"{' **collapsed**' if name in div['collapsed'] else ''} |" for c, name in enumerate(names)]
    lines += [
        "", f"Classes with a diversity ratio below {div['threshold']} are flagged as collapsed: "
        f"{', '.join(div['collapsed']) or 'none'}.", "",
        f"## Memorisation (distance to closest record, {mem['space']})", "",
        "| queries | share closer to train than to test | median DCR train / DCR test | DCR to train, 5th pct "
        "| DCR to test, 5th pct |", "|---|---|---|---|---|",
    ]
    for key, label in (("synthetic", "synthetic images"), ("real_holdout", "fresh real images (baseline)")):
        m = mem[key]
        lines.append(f"| {label} | {fmt(m['share_closer_to_train'])} | {fmt(m['dcr_ratio_median'])} | "
                     f"{fmt(m['dcr_train_p5'])} | {fmt(m['dcr_test_p5'])} |")
    lines += ["", f"Train: {mem['n_train']} images; reference: a random half of the {result['dataset'].get('split', 'test')} "
              f"split, {mem['n_test_reference']} images; fresh holdout (the other half): "
              f"{mem['n_holdout']}. Excess share over fresh images: {fmt(mem['excess_share'])}; closest-synthetic / "
              f"closest-fresh DCR ratio: {fmt(mem['dcr_train_p5_ratio'])}. Copying shows as a positive excess share "
              "together with DCR ratios below the fresh images' (near 0 for copies); a positive excess share with "
              "ratios above theirs points to synthetic images far from all real ones, not to copies.", ""]
    return "\n".join(lines)


def unlearned_classes(result: dict[str, Any]) -> list[str]:
    """Classes a TSTR classifier recognises in fewer than UNLEARNED_RECALL of the real images (the
    datasheet flags them too), with the remedy measured where it happened."""
    names, recall = result["dataset"]["class_names"], result["tstr"]["per_class_recall"]["mean"]
    missed = [name for name, r in zip(names, recall) if r < UNLEARNED_RECALL]
    if not missed or len(names) < 2:
        return []
    g_steps, eps = result.get("run_g_steps"), result["epsilon"]
    lines = ["", f"**Classes not learned:** {', '.join(map(str, missed))} (TSTR recall below {UNLEARNED_RECALL:.0%}): "
                 "the synthetic images of these classes do not carry what tells them apart."]
    noise = result.get("run_d_noise")  # recorded by runs since 2026-12-06; before, epsilon stands in for it
    if noise is not None:
        low_noise = noise <= AUTO_G_STEPS_MAX_NOISE
    else:
        low_noise = eps >= 5 if eps is not None else result.get("ledger", "verified") == "verified"  # None: no DP
    if isinstance(g_steps, int) and g_steps < AUTO_G_STEPS["low noise"] and low_noise:
        lines[-1] += (f" The run took {g_steps} generator steps per round at a low DP noise; on an RGB phantom with 10 "
                      "classes at epsilon 10, 8 steps lifted TSTR AUC from 0.811 / 0.783 to 0.890 / 0.897 (two training "
                      "seeds; docs/quality-findings.md): train with `--g-steps 0` (the default since 2026-12-06, which "
                      "takes 8 where the discriminator's noise is low) or `--g-steps 8`; under heavy noise more generator "
                      "steps learn D's noise instead.")
    return lines


def save_comparison_grid(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                         fake_labels: torch.Tensor, class_names: Sequence[str], path: str | Path,
                         per_class: int = GRID_PER_CLASS) -> None:
    """Per class, a row of real images above a row of synthetic ones."""
    rows = []
    for c, name in enumerate(class_names):
        for kind, images, labels in (("real", real, real_labels), ("synthetic", fake, fake_labels)):
            picked = images[labels == c][:per_class]
            blank = torch.full((per_class - len(picked), *images.shape[1:]), -1.0)
            rows.append((f"{name}\n{kind}", torch.cat([picked.cpu(), blank])))
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_class * 0.7 + 1.2, len(rows) * 0.8 + 0.3), squeeze=False)
    for ax, (label, row) in zip(axes[:, 0], rows):
        strip = torch.cat(list(to_uint8(row)), dim=1).numpy()
        ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(result: dict[str, Any], out: Path) -> str:
    """Write evaluation.json and EVALUATION.md into ``out``; return the markdown."""
    text = markdown(result)
    atomic_write_json(out / "evaluation.json", json_safe(result))
    atomic_write_bytes(out / "EVALUATION.md", text.encode())
    return text
