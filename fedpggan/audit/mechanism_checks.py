"""Does each site's recorded mechanism follow from the run's config?

The trainers derive everything from the config and the site's (public) record count:
q = 1/ceil(n / batch-size); steps per round = local-steps (federated) or, centralised,
ceil(ceil(n/B)/d-steps) * d-steps per epoch; planned steps = rounds (epochs) x that; and
sigma calibrated so that the planned steps end at the budget. A ledger that disagrees was
produced by something else, or edited.
"""

from __future__ import annotations

import math

from fedpggan.audit import accountants
from fedpggan.audit.findings import Finding, below, exceeds
from fedpggan.audit.records import RunFacts, Site, number
from fedpggan.privacy.accounting import default_delta
from fedpggan.privacy.dp_discriminator import sample_rate


def config_int(facts: RunFacts, key: str) -> int | None:
    value = number(facts.config.get(key))
    return int(value) if value is not None and value >= 1 else None


def steps_per_round(site: Site, facts: RunFacts) -> tuple[int | None, int | None]:
    """(D steps one round/epoch should take, planned steps), None where the config lacks a key."""
    if facts.kind == "federated":
        local, rounds = config_int(facts, "local-steps"), config_int(facts, "rounds")
        return local, (local * rounds if local and rounds else None)
    batch, d_steps, epochs = (config_int(facts, k) for k in ("batch-size", "d-steps", "epochs"))
    if not (batch and d_steps):
        return None, None
    per_epoch = math.ceil(math.ceil(site.public_num_records / batch) / d_steps) * d_steps
    return per_epoch, (per_epoch * epochs if epochs else None)


def check_mechanism(site: Site, facts: RunFacts) -> list[Finding]:
    p, out = site.prefix, []
    missing = [k for k in ("batch-size", "local-steps" if facts.kind == "federated" else "d-steps")
               if config_int(facts, k) is None]
    out += [Finding(f"run.json:config.{k}", "missing or not a positive integer; steps cannot be checked") for k in missing]
    batch = config_int(facts, "batch-size")
    if batch:
        expected_q = sample_rate(site.public_num_records, batch)
        if not math.isclose(site.sample_rate, expected_q, rel_tol=1e-9):
            out.append(Finding(f"{p}.sample_rate", f"{site.sample_rate:.6g} but 1/ceil(public_num_records "
                                                   f"{site.public_num_records} / batch-size {batch}) = {expected_q:.6g}"))
    per_round, planned = steps_per_round(site, facts)
    for i, r in enumerate(site.rounds):
        for name, value, expected in (("noise_multiplier", r.noise_multiplier, site.noise_multiplier),
                                      ("sample_rate", r.sample_rate, site.sample_rate), ("delta", r.delta, site.delta)):
            if not math.isclose(value, expected, rel_tol=1e-9):
                out.append(Finding(f"{p}.rounds[{i}].{name}", f"round {r.round} records {value:.6g}, the site {expected:.6g}"))
        if per_round is not None and r.steps != per_round:
            out.append(Finding(f"{p}.rounds[{i}].steps", f"round {r.round} took {r.steps} steps; the config gives {per_round}"))
    if planned is not None and site.planned_steps != planned:
        out.append(Finding(f"{p}.planned_steps", f"{site.planned_steps}, but the config gives {planned}"))
    total = sum(r.steps for r in site.rounds) + site.unrecorded_steps
    if total > site.planned_steps:
        out.append(Finding(f"{p}.rounds", f"{total} steps taken ({site.unrecorded_steps} of them outside the recorded "
                                          f"rounds), more than planned_steps {site.planned_steps}"))
    return out + check_noise(site) + check_budget_and_delta(site, facts)


def check_noise(site: Site) -> list[Finding]:
    """sigma is what calibrate_noise gives for the budget: equivalently (epsilon is monotone in
    sigma) the declared accountant puts ``planned_steps`` at sigma within tolerance of the budget.
    One accountant evaluation instead of calibrate_noise's binary search."""
    if site.accountant not in accountants.ACCOUNTANTS:
        return [Finding(f"{site.prefix}.accountant", f"{site.accountant!r} is not a known accountant "
                                                     f"({', '.join(accountants.ACCOUNTANTS)})")]
    try:
        planned = (*site.release_history, (site.noise_multiplier, site.sample_rate, site.planned_steps))
        eps = accountants.epsilon(site.accountant, planned, site.delta)
    except Exception as exc:  # numerical failure: the mechanism cannot be checked
        return [Finding(f"{site.prefix}.noise_multiplier", f"{site.accountant} failed on it ({type(exc).__name__})")]
    if exceeds(eps, site.budget_epsilon):
        return [Finding(f"{site.prefix}.noise_multiplier",
                        f"{site.noise_multiplier:.6g} gives epsilon {eps:.4g} over the planned {site.planned_steps} steps "
                        f"({site.accountant}), above the budget {site.budget_epsilon:g}: less noise than the calibrated level")]
    if not below(eps, site.budget_epsilon):  # calibration stops within its tolerance below the budget
        return []
    return [Finding(f"{site.prefix}.noise_multiplier",
                    f"{site.noise_multiplier:.6g} gives epsilon {eps:.4g} over the planned {site.planned_steps} steps "
                    f"({site.accountant}), not the budget {site.budget_epsilon:g}: it is not the calibrated noise")]


def check_budget_and_delta(site: Site, facts: RunFacts) -> list[Finding]:
    p, out = site.prefix, []
    budget = number(facts.config.get("epsilon"))
    if budget is None or not math.isclose(site.budget_epsilon, budget, rel_tol=1e-9):
        out.append(Finding(f"{p}.budget_epsilon", f"{site.budget_epsilon:g}, but run.json config epsilon is "
                                                  f"{facts.config.get('epsilon')!r}"))
    if not site.delta < 1.0 / site.public_num_records:
        out.append(Finding(f"{p}.delta", f"{site.delta:g} is not below 1/n = 1/{site.public_num_records}: "
                                         "the guarantee would allow leaking a whole record"))
    config_delta = number(facts.config.get("delta")) or 0.0  # 0: each site's default, min(1e-5, 1/(10 n))
    run_delta = config_delta if config_delta > 0 else default_delta(site.public_num_records)
    if site.delta > run_delta * (1 + 1e-9):
        source = f"the config delta {config_delta:g}" if config_delta > 0 else (
            f"the default min(1e-5, 1/(10 n)) = {run_delta:g} for its {site.public_num_records} records (config delta 0)")
        out.append(Finding(f"{p}.delta", f"{site.delta:g} exceeds {source}"))
    if facts.config.get("accountant") not in (None, site.accountant):
        out.append(Finding(f"{p}.accountant", f"{site.accountant!r}, but the config says {facts.config['accountant']!r}"))
    clip = number(facts.config.get("max-grad-norm"))
    if clip is not None and not math.isclose(site.max_grad_norm, clip, rel_tol=1e-9):
        out.append(Finding(f"{p}.max_grad_norm", f"{site.max_grad_norm:g}, but the config clips at {clip:g}"))
    if facts.kind == "centralised" and facts.num_records is not None and site.public_num_records != facts.num_records:
        out.append(Finding(f"{p}.public_num_records", f"{site.public_num_records}, but run.json dataset has "
                                                      f"{facts.num_records} records"))
    return out
