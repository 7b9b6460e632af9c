"""The audit's outputs: audit.json (machine), AUDIT.md (people), audit_epsilon.png, a table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedpggan.audit.accountants import ACCOUNTANTS
from fedpggan.io import atomic_write_bytes, atomic_write_json


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}g}"
    return str(value)


def site_table(result: dict[str, Any]) -> str:
    """Fixed-width table: claimed vs recomputed epsilon per site (printed and in AUDIT.md)."""
    header = ["site", "budget", "claimed", *ACCOUNTANTS, "tightest", "replace-one", "declared", "steps", "verdict"]
    body = [[row["site"], fmt(row["budget_epsilon"]), fmt(row["claimed_epsilon"]),
             *(fmt(row["recomputed"].get(a)) for a in ACCOUNTANTS), fmt(row.get("tightest_epsilon")),
             fmt(row.get("replace_one_epsilon")),
             row["declared_accountant"], f"{row['steps']}" + (f"+{row['unrecorded_steps']}" if row.get("unrecorded_steps") else "")
             + f"/{row['planned_steps']}", "PASS" if row.get("passed") else "FAIL"]
            for row in result["sites"].values()]
    if not body:
        return "no DP sites: no epsilon to recompute"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def summary(result: dict[str, Any]) -> str:
    """What the command prints: the table, the membership-inference results, the verdict."""
    lines = [site_table(result)]
    for site, attacks in result.get("mia", {}).get("sites", {}).items():
        lines += [f"membership inference, site {site}, {name}: AUC {m['auc']:.3f} {ci(m['auc_ci95'])}, "
                  f"TPR@1%FPR {m['tpr_at_fpr_0.01']:.3f}, epsilon >= {m['epsilon_lower_bound']:.3g} (95%)"
                  for name, m in attacks.items()]
    lines += [f"note: {n}" for n in result["notes"]]
    lines += ["", f"audit {'PASSED' if result['passed'] else 'FAILED'}: {len(result['violations'])} violation(s)"]
    lines += [f"  - {v['field']}: {v['reason']}" for v in result["violations"]]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    tol = result["tolerance"]
    out = [f"# Privacy audit of run `{result['run_id']}`", "",
           f"**Verdict: {'PASS' if result['passed'] else 'FAIL'}** ({len(result['violations'])} violation(s)); "
           f"{result['kind']} run, audited {result['date']}.", "",
           "## Epsilon per site (claimed vs recomputed)", "", "```", site_table(result), "```", "",
           f"Rule: {result['rule']} Tolerance: claims against budgets and recomputations {tol.get('claims_and_budgets', 0):g} "
           f"(rounding); between different computations {tol['relative']:.0%} relative + {tol['absolute']} absolute.", ""]
    out += ["## Violations", ""] + ([f"- `{v['field']}`: {v['reason']}" for v in result["violations"]] or ["none"])
    if result["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    out += ["", "## Checkpoints", "", "| round | file | status |", "|---|---|---|"]
    out += [f"| {c['round']} | {c['file']} | {c['status']} |" for c in result["checkpoints"]]
    if "mia" in result:
        out += ["", *mia_markdown(result["mia"])]
    out += ["", "## Assumptions (from the ledger)", ""] + [f"- {a}" for a in result["assumptions"]]
    out += ["", "## Versions", "", f"- audit: {result['versions']['audit']}", f"- run: {result['versions']['run']}", ""]
    return "\n".join(out)


def mia_markdown(mia: dict[str, Any]) -> list[str]:
    out = ["## Membership inference (empirical)", "", f"Checkpoint `{mia['checkpoint']}`. Method: {mia['method']}.", "",
           "| site | attack | members / non-members | AUC [95% CI] | TPR@FPR 1% [CI] | TPR@FPR 0.1% [CI] | epsilon >= (95%) |",
           "|---|---|---|---|---|---|---|"]
    for site, attacks in mia["sites"].items():
        for name, m in attacks.items():
            cells = [f"{fmt(m[k], 3)} {ci(m[k + '_ci95'])}" for k in ("auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001")]
            out.append(f"| {site} | {name} | {m['members']} / {m['non_members']} | {' | '.join(cells)} | "
                       f"{fmt(m['epsilon_lower_bound'], 3)} |")
    out += ["", "AUC 0.5 = the attack cannot tell members from non-members; the epsilon lower bound is what the attack "
            "*proves* is leaked (it must stay below the accounted epsilon)."]
    return out


def ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def plot_epsilon(result: dict[str, Any], path: Path) -> None:
    """Cumulative epsilon vs round per site: claimed, RDP every round, declared accountant
    at sampled rounds; the budget as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from fedpggan.plots import LEGEND_LIMIT, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, row in enumerate(result["sites"].values()):
        curve, colour = row.get("curve"), f"C{i % 10}"
        if not curve:
            continue
        ax.plot(curve["round"], [math.nan if v is None else v for v in curve["claimed"]], color=colour, marker=".",
                label=f"site {row['site']} claimed")
        ax.plot(curve["round"], curve["rdp"], color=colour, linestyle=":", label=f"site {row['site']} RDP")
        points = curve.get(f"{row['declared_accountant']}_points", {})
        ax.plot(list(points), list(points.values()), "o", color=colour, fillstyle="none",
                label=f"site {row['site']} {row['declared_accountant']} (recomputed)")
        ax.axhline(row["budget_epsilon"], color=colour, linestyle="--", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round" if result["kind"] == "federated" else "epoch")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title(f"{result['run_id']}: epsilon vs round (dashed: budget)" if result["sites"] else "no DP: no epsilon")
    if result["sites"] and len(ax.lines) <= 3 * LEGEND_LIMIT:  # three lines per site; beyond, audit.md names them
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "audit.json", result)
    atomic_write_bytes(out / "AUDIT.md", markdown(result).encode())
    plot_epsilon(result, out / "audit_epsilon.png")
