"""``datasheet.json`` and ``DATASHEET.md``: what the images are, where they come from, what
privacy they carry, and what they must not be used for -- so the data can travel alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpggan.config import UNLEARNED_RECALL
from fedpggan.data.sources import SITE_DATA, public_name
from fedpggan.export.provenance import AUDIT_LABELS, Provenance
from fedpggan.io import sha256_json
from fedpggan.runs import library_versions, now_iso

INTENDED_USE = [
    "Sharing, teaching and prototyping image pipelines without access to the private training images.",
    "Benchmarking and pre-training models that are then validated on real, held-out data.",
]
LIMITATIONS = [
    "Synthetic images made by a GAN: they show no real patient and are NOT for diagnosis, clinical decisions "
    "or as ground truth.",
    "Labels are the classes the generator was asked for; some images may not show their class faithfully.",
    "Class balance is the one requested at export, not the prevalence in the private data.",
    "Quality and diversity are below real data; models trained on it must be tested on real data before use.",
]
# Only TSTR is published: a classifier trained on synthetic images (post-processing of the DP
# generator) and tested on the real test split. Every other figure of `fedpggan evaluate` -- TRTR,
# FID, PRDC, label fidelity, diversity and its collapsed classes, memorisation -- reads the real
# training images without DP, so it stays in the run's EVALUATION.md, for the consortium only.
PUBLISHED_QUALITY_KEYS = ("tstr",)
# Below this TSTR AUC the datasheet warns that the images are of little use for training (0.5 = chance);
# measured there: BreastMNIST at epsilon 1 (docs/quality-results.md)
LOW_UTILITY_AUC = 0.6
NOT_PUBLISHED = ("The evaluation's other figures (TRTR, FID, precision/recall, label fidelity, diversity, memorisation) "
                 "read the real training images without differential privacy: they stay in the source run's "
                 "EVALUATION.md and are not published with the data.")
DP_MEANING = ("The images are post-processing of a generator trained with differential privacy, so they carry "
              "the run's (epsilon, delta) guarantee at no extra cost: anything computed from them reveals at most "
              "that much about any one training image (one record at one site). It does not hide population-level "
              "patterns, and holds only under the ledger's assumptions.")


def config_sha256(run: dict[str, Any]) -> str:
    """Hash of the canonical JSON of the run's options: identifies the training setup."""
    return sha256_json(run.get("config", {}))


DATASHEET_FILES = ("datasheet.json", "DATASHEET.md")


def build_datasheet(prov: Provenance, export: dict[str, Any]) -> dict[str, Any]:
    """The datasheet as a dict; ``export`` describes what was written (counts, files, options)."""
    run, ledger, dataset = prov.run, prov.ledger, prov.run.get("dataset", {})
    dp = bool(ledger.get("dp"))
    warnings = []
    if dataset.get("is_medical") is False:
        warnings.append("NOT MEDICAL DATA: the run was trained on a procedurally generated phantom dataset.")
    if not dp:
        warnings.append("NO PRIVACY GUARANTEE: the run was trained without differential privacy; these images "
                        "may reveal the training images.")
    if prov.audit["status"] == "unaudited":
        warnings.append(f"{AUDIT_LABELS['unaudited']}: no `fedpggan audit` of this run as it is now; its privacy "
                        "claims are unchecked.")
    elif prov.audit["status"] == "failed":
        warnings.append(f"{AUDIT_LABELS['failed']} ({prov.audit['date']}): the run's privacy claims did not survive "
                        "the audit" + "".join(f"; {v}" for v in prov.audit.get("violations", [])) + ".")
    unit = "epoch" if run.get("kind") == "centralised" else "round"
    trained_epochs = (run.get("config") or {}).get("epochs") if unit == "epoch" else None  # a completed run trains all
    if run.get("status") != "completed":
        warnings.append(f"INCOMPLETE RUN: the source run's status is {run.get('status')!r} (stopped or interrupted before "
                        f"its planned end); the generator is the one of {unit} {prov.checkpoint_round}.")
    elif isinstance(trained_epochs, int) and prov.checkpoint_round < trained_epochs:
        warnings.append(f"EARLIER GENERATOR: the run trained {trained_epochs} epochs; this generator is the one of epoch "
                        f"{prov.checkpoint_round} (the later epochs' weights were lost, or an earlier checkpoint was chosen); "
                        "the privacy figures count every epoch trained.")
    discarded = next((c.get("discarded") for c in ledger.get("checkpoints", [])
                      if c.get("sha256") == prov.checkpoint_sha256 and c.get("discarded")), None)
    if discarded:
        warnings.append(f"CHECKPOINT SET ASIDE: the run marked this checkpoint discarded ({discarded}) and went on from an "
                        "earlier one; its rounds were charged, so the privacy figures hold, but no later round built on it.")
    quality = quality_summary(prov.evaluation, prov.checkpoint_sha256)
    warnings += quality_warnings(quality)
    if quality and quality["same_checkpoint"] is False:
        warnings.append("QUALITY MEASURED ON ANOTHER CHECKPOINT: the quality figures are those of another generator "
                        "checkpoint of the run than the one exported; run `fedpggan evaluate` with the exported checkpoint.")
    if quality and quality["real_data"]:
        generator = quality["settings"].get("generator")
        evaluated = (None if generator is None else str(generator), quality["real_data"].get("image_size"))
        exported = (str(export["generator"]), export["image_size"])
        if None not in evaluated and evaluated != exported:
            warnings.append(f"QUALITY MEASURED ON OTHER SETTINGS: evaluated with generator {evaluated[0]} at {evaluated[1]} px; "
                            f"this export uses generator {exported[0]} at {exported[1]} px.")
        if quality["real_data"].get("split", "test") != "test":
            warnings.append(f"QUALITY MEASURED ON THE {quality['real_data']['split'].upper()} SPLIT: the figures are not "
                            "the test split's; run `fedpggan evaluate` without --split for figures to publish.")
        # Only public benchmark names can be compared: a site's own data is "site data" on both sides.
        tested, trained = quality["real_data"]["name"], public_name(str(dataset.get("name")))
        if SITE_DATA not in (tested, trained) and tested != trained:
            warnings.append(f"QUALITY MEASURED ON OTHER DATA: evaluated on the {tested} test split; the run was "
                            f"trained on {trained}.")
    sites = ledger.get("sites", {})
    return {
        "format": 1,
        "title": f"Synthetic images from fedpggan run {run.get('run_id')} ({public_name(str(dataset.get('name')))})",
        "created": now_iso(),
        "warnings": warnings,
        "source_run": {"run_id": run.get("run_id"), "kind": run.get("kind"), "config_sha256": config_sha256(run),
                       "num_sites": run.get("num_sites"), "status": run.get("status")},
        "dataset": {"name": public_name(str(dataset.get("name"))),
                    **{k: dataset.get(k) for k in ("is_medical", "num_classes", "class_names")}},
        "privacy": {
            "dp": dp, "mechanism": ledger.get("mechanism"), "guarantee": ledger.get("guarantee"),
            "accountants": sorted({s["accountant"] for s in sites.values() if s.get("accountant")}),
            "sites": {sid: {**{k: s.get(k) for k in ("epsilon", "delta", "budget_epsilon", "accountant", "status")},
                            "replace_one_epsilon": prov.audit.get("replace_one_epsilon", {}).get(str(sid))}
                      for sid, s in sites.items()},
            "assumptions": ledger.get("assumptions", []),
            "meaning": DP_MEANING if dp else "none: trained without differential privacy",
        },
        "audit": {k: v for k, v in prov.audit.items() if k != "replace_one_epsilon"},  # per site under "privacy"
        "generator": {"checkpoint": prov.checkpoint.name, "round": prov.checkpoint_round, "unit": unit,
                      "sha256": prov.checkpoint_sha256, "weights": "EMA"},
        "export": export,
        "quality": quality,
        "versions": library_versions(),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }


def quality_summary(evaluation: dict[str, Any] | None, checkpoint_sha256: str) -> dict[str, Any] | None:
    """Headline figures of ``fedpggan evaluate`` (RUN/evaluation.json), flattened, with what they
    rest on (the real data, the evaluation's size) and what it flagged (collapsed classes), and
    whether they were measured on the checkpoint being exported."""
    if not isinstance(evaluation, dict):
        return None
    picked = {k: evaluation[k] for k in PUBLISHED_QUALITY_KEYS if k in evaluation}
    evaluated = (evaluation.get("checkpoint") or {}).get("sha256")
    settings, real = evaluation.get("settings") or {}, evaluation.get("dataset") or {}
    recall, names = ((evaluation.get("tstr") or {}).get("per_class_recall") or {}).get("mean"), real.get("class_names")
    return {"figures": dict(flatten(picked)), "created": evaluation.get("created"),
            # TSTR too (a classifier trained on the synthetic images, tested on the real test split), per class
            "tstr_recall_per_class": dict(zip(names, recall)) if isinstance(recall, list) and isinstance(names, list)
            and len(recall) == len(names) else None,
            "evaluated_checkpoint_sha256": evaluated,
            "same_checkpoint": evaluated == checkpoint_sha256 if evaluated else None,
            # the test split's name and size only: never a file path, nor anything about the training images
            "real_data": {"name": public_name(str(real.get("name"))), "split": real.get("split", "test"), "n_test": real.get("n_test"),
                          "image_size": real.get("image_size")} if real else None,
            "settings": {k: settings.get(k) for k in ("n_synthetic", "seeds", "classifier_budget", "generator")},
            "quick": settings.get("quick"), "short_of_report": settings.get("short_of_report", []),
            "not_published": NOT_PUBLISHED}


def quality_warnings(quality: dict[str, Any] | None) -> list[str]:
    """What the evaluation flagged, for the datasheet's warnings: figures that are a smoke check."""
    if quality is None:
        return []
    warnings = []
    if quality["quick"]:
        warnings.append(f"QUICK EVALUATION: the quality figures come from a smoke check "
                        f"({', '.join(quality['short_of_report'])}), not figures to report; run `fedpggan evaluate` "
                        "with the report's settings (no --quick, nor smaller --n-synthetic, --seeds, --steps or --epochs).")
    auc = quality["figures"].get("tstr.auc.mean")
    if isinstance(auc, (int, float)) and auc < LOW_UTILITY_AUC:
        warnings.append(f"LOW UTILITY: a classifier trained on these images reaches a TSTR AUC of {auc:.3g} on the real "
                        "test split (0.5 is chance): they carry little a classifier can use; do not train models for "
                        "this task on them.")
    missed = [str(name) for name, r in (quality.get("tstr_recall_per_class") or {}).items()
              if isinstance(r, (int, float)) and r < UNLEARNED_RECALL]
    if missed:
        warnings.append(f"CLASSES NOT LEARNED: a classifier trained on these images recognises fewer than "
                        f"{UNLEARNED_RECALL:.0%} of the real test images of {', '.join(missed)} (TSTR recall): the "
                        "synthetic images of those classes do not carry what tells them apart; do not rely on them "
                        "for those classes.")
    return warnings


def write_datasheet(folder: Path, sheet: dict[str, Any]) -> None:
    """Plain writes: the staging folder already makes the export all-or-nothing, and the files
    keep normal (shareable) permissions."""
    json_name, markdown_name = DATASHEET_FILES
    (folder / json_name).write_text(json.dumps(sheet, indent=2) + "\n")
    (folder / markdown_name).write_text(render_markdown(sheet))


def replace_one_text(priv: dict[str, Any], audit: dict[str, Any]) -> str:
    """The worst site's epsilon under replace-one adjacency, from a passed audit: the sound reading
    of the guarantee for a reader who takes the sites' record counts as known. Quoted only when
    the audit has it for every site, so a missing site cannot hide the worst one."""
    if audit["status"] != "passed":
        return ""
    missing = [sid for sid, s in priv["sites"].items() if s.get("replace_one_epsilon") is None]
    if missing:
        return (f"; under replace-one adjacency: not in this audit for site(s) {', '.join(map(str, missing))} "
                "(re-run `fedpggan audit`)")
    return f"; under replace-one adjacency epsilon {num(max(s['replace_one_epsilon'] for s in priv['sites'].values()))} (audit)"


def budget_note(guarantee: dict[str, Any]) -> str:
    """Why the guarantee may be a site's budget rather than its last claim (fedpggan.privacy.ledger.epsilon_bound)."""
    counted = (guarantee.get("counted_at_budget") or {}).get("sites") or {}
    if not counted:
        return ""
    return ("; site(s) " + ", ".join(f"{site} (round {n})" for site, n in counted.items())
            + " counted at their budget: a round failed or was excluded after their last report and may have been spent")


def replace_one_cell(site: dict[str, Any], audit: dict[str, Any]) -> str:
    if site.get("replace_one_epsilon") is not None:
        return num(site["replace_one_epsilon"])
    return "not in this audit: re-run `fedpggan audit`" if audit["status"] == "passed" else "-"


def render_markdown(sheet: dict[str, Any]) -> str:
    src, priv, exp, gen, audit = (sheet[k] for k in ("source_run", "privacy", "export", "generator", "audit"))
    g = priv.get("guarantee") or {}
    lines = [f"# {sheet['title']}", ""]
    lines += [f"> **{w}**" for w in sheet["warnings"]] + ([""] if sheet["warnings"] else [])
    lines += [
        "| | |", "|---|---|",
        f"| Source run | `{src['run_id']}` ({src['kind']}, {src['num_sites']} site(s)) |",
        f"| Run config sha256 | `{src['config_sha256']}` |",
        f"| Dataset | {sheet['dataset']['name']} |",
        "| Privacy | " + (f"({num(g.get('epsilon'))}, {num(g.get('delta'))})-DP per record (add/remove adjacency), "
                           f"accountant {', '.join(priv['accountants'])}{replace_one_text(priv, audit)}{budget_note(g)}"
                           if priv["dp"] else "**NONE**") + " |",
        f"| Audit | {audit['status'].upper()}" + (f", {audit['date']}" if audit["date"] else "") + " |",
        f"| Generator | `{gen['checkpoint']}` ({gen['unit']} {gen['round']}, {gen['weights']} weights), "
        f"sha256 `{gen['sha256']}` |",
        f"| Images | {exp['num_images']} ({exp['image_size']}x{exp['image_size']}, {exp['channels']} channel(s)), "
        f"seed {exp['seed']} |",
        f"| Created | {sheet['created']} |", "",
        "## Contents", "", "| split | " + " | ".join(sheet["dataset"]["class_names"]) + " | total |",
        "|---" * (len(sheet["dataset"]["class_names"]) + 2) + "|",
    ]
    for split, counts in exp["split_counts"].items():
        lines.append(f"| {split} | " + " | ".join(map(str, counts.values())) + f" | {sum(counts.values())} |")
    files = [f"`{name}` (sha256 `{sha}`)" for name, sha in exp["files"].items()]
    files += [f"`images/` ({exp['num_images']} PNG files in class folders)"] if exp["class_folders"] else []
    lines += [""] + ([f"Class folders (label id prefix = npz label): {', '.join(exp['class_folders'])}."] if exp["class_folders"] else [])
    lines += ["Generators (EMA): " + ", ".join(f"{k} {v}" for k, v in exp["generator_counts"].items())
              + (" (within each split G1's rows come first, then G2's: shuffle before slicing a split into parts)"
                 if all(exp["generator_counts"].values()) else "") + ". Files: " + ", ".join(files) + ".", ""]
    lines += ["## Privacy", "", priv["meaning"], "",
              "| site | epsilon | delta | budget | accountant | status | epsilon under replace-one (audit) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {sid} | {num(s['epsilon'])} | {num(s['delta'])} | {num(s['budget_epsilon'])} | "
              f"{s['accountant']} | {s['status']} | {replace_one_cell(s, audit)} |" for sid, s in priv["sites"].items()]
    lines += [""] + [f"- {a}" for a in priv["assumptions"]] + [""]
    lines += ["## Quality", ""] + quality_lines(sheet["quality"]) + [""]
    lines += ["## Intended use", ""] + [f"- {u}" for u in sheet["intended_use"]] + [""]
    lines += ["## Limitations", ""] + [f"- {u}" for u in sheet["limitations"]] + [""]
    lines += ["## Reproduce", "", "Run from the folder that holds the run folder (the run, the output and any option file "
              "are named without their folders):", "", f"    {exp['command']}", "",
              "Library versions: " + ", ".join(f"{k} {v}" for k, v in sheet["versions"].items()), ""]
    return "\n".join(lines)


def quality_lines(quality: dict[str, Any] | None) -> list[str]:
    if not quality:
        return ["Not evaluated (run `fedpggan evaluate` on the run to add TSTR AUC and other figures)."]
    note = {True: "on the exported checkpoint", False: "on a DIFFERENT checkpoint than the one exported",
            None: "checkpoint not recorded"}[quality["same_checkpoint"]]
    real, settings = quality["real_data"], quality["settings"]
    size = {True: "**QUICK evaluation** (a smoke check: " + ", ".join(quality["short_of_report"]) + ")",
            False: "at least the report defaults", None: "size against the report defaults not recorded"}[quality["quick"]]
    return [f"From `fedpggan evaluate` ({quality['created']}, {note}):", "",
            "- real test data: " + (f"{real['name']}, {real['n_test']} {real.get('split', 'test')} images" if real else "not recorded"),
            (f"- evaluation: {settings['n_synthetic']} synthetic images, seeds {settings['seeds']}, classifier "
             f"{settings['classifier_budget']}; {size}" if settings["n_synthetic"] else "- evaluation: settings not recorded"),
            "", "TSTR (a classifier trained on these synthetic images, tested on the real test split):", ""] \
        + [f"- {k}: {num(v)}" for k, v in quality["figures"].items()] \
        + (["- recall per class: " + ", ".join(f"{name} {num(r)}" for name, r in quality["tstr_recall_per_class"].items())]
           if quality.get("tstr_recall_per_class") else []) + ["", quality["not_published"]]


def num(value: Any) -> str:
    """Four significant digits for people (the JSON keeps full precision)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts as ('a.b', value), for a readable quality list."""
    if not isinstance(obj, dict):
        return [(prefix, obj)] if not isinstance(obj, list) else []
    return [item for k, v in obj.items() for item in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
