"""The server side of a federated run: rounds, aggregation, generator training, ledger.

The server owns G1 and G2 and never sees a real image: it sends D and the generators to
the sites, receives DP-trained discriminators and each site's privacy spend, averages the
discriminators, and trains the generators against the average (post-processing).
Rounds are seeded from (seed, round), so a run resumed from its last checkpoint continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm import tqdm

from fedpggan.build import build_gan, derived_seed, pick_device, prior_tensor, seed_everything
from fedpggan.config import AUTO_G_STEPS_MAX_NOISE, RunConfig, replies_needed, sites_per_round
from fedpggan.data.sources import common_public_name, run_dataset_name
from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_bytes, sha256_bytes
from fedpggan.plots import save_curves, save_sample_grid
from fedpggan.privacy import epsilon_of
from fedpggan.privacy.dp_discriminator import mechanism_name
from fedpggan.privacy.feature_release import features_for, release_entry, release_history
from fedpggan.privacy.secure_sum import SECURE_SUM_ASSUMPTION, epsilon_if_all_other_sites_collude, release_share_noise
from fedpggan.privacy.ledger import PrivacyLedger, finite_or_none, spent_outside_rounds
from fedpggan.privacy.mechanism import Mechanism, run_d_noise, site_mechanism
from fedpggan.privacy.noise import SEEDED_NOISE_WARNING
from fedpggan.runs import RunFolder, default_run_dir, library_versions, now_iso, refuse_completed, resumed_with
from fedpggan.wire import (answering_node, destinations, generator_arrays, load_generator_state, site_error,
                           train_content)
from pggan_model import CASES, GeneratorTrainer, generator_step_summary, load_checkpoint, save_checkpoint
from pggan_model.mean_embedding import class_means, release_noise_ratio, vouched_classes
from server.aggregation import aggregate, aggregation_assumption
from server.secure_release import SecureSum, SecureSumFailed, secure_sum
from server.validation import (ROBUST_MIN_UPDATES, outlier_problems, release_problem, reply_problem, site_facts_problem,
                               update_norm, update_problem)

# Rounds in a row with fewer than --min-clients valid replies before the run stops.
MAX_FAILED_ROUNDS = 3
SERVER_STREAM = 1_000_003  # seed stream of the server's own randomness (selection, G steps)

CURVE_PANELS = {
    "generator losses": ["loss_g1", "loss_g2", "loss_embedding"],
    "average-loss rule cases": [f"case_{c}" for c in CASES],
    "D score of fakes (server side)": ["d_fake_score"],
}


class FederatedRun:
    """One run: call :meth:`run` with a Flower Grid."""

    def __init__(self, grid: Grid, cfg: RunConfig, resume: bool = False) -> None:
        self.grid, self.cfg, self.resume = grid, cfg, resume
        self.folder = RunFolder(cfg.out or default_run_dir(), cfg.keep_checkpoints)
        self.device = pick_device(cfg.device)
        self.sites: dict[int, dict[str, Any]] = {}  # node id -> public facts
        self.expected_mechanism: dict[int, Mechanism] = {}  # site size -> mechanism
        self.collusion_epsilon: dict[tuple[int, int], float] = {}  # (site size, N of its share) -> worst case of a secure release
        self.failed_rounds = 0

    # --- set-up ------------------------------------------------------------------------
    def run(self) -> Path:
        if not self.resume:
            self.folder.create()
        with self.folder.held():  # one ServerApp per run folder: a second one would charge the sites' rounds again
            return self.run_rounds()

    def run_rounds(self) -> Path:
        cfg = self.cfg
        self.sites = self.discover_sites()
        facts = next(iter(self.sites.values()))
        self.class_names = list(facts["class-names"])
        seed_everything(cfg.seed)  # the initial weights: a run is reproducible from its seed
        self.gan = build_gan(cfg, int(facts["image-size"]), int(facts["channels"]), len(self.class_names)).to(self.device)
        self.g_trainer = GeneratorTrainer(self.gan)
        self.prior = prior_tensor(cfg, len(self.class_names))
        self.features = features_for((int(facts["channels"]), int(facts["image-size"]), int(facts["image-size"])),
                                     cfg.embedding_frequencies, cfg.seed, cfg.embedding_blur)
        self.releases: dict[str, torch.Tensor] = {}
        self.release_noise_ratio = math.inf  # no release yet
        first_round = self.restore() if self.resume else self.start(facts)
        self.g_steps = self.choose_generator_steps()
        status, reason = "completed", f"{cfg.rounds} rounds done"
        if why := self.no_round_can_succeed():  # before the secure release charges every site
            self.finish("stopped", why)
            return self.folder.root
        if cfg.release_aggregation == "secure" and cfg.embedding_weight > 0:
            try:
                self.secure_release()
            except Exception as exc:  # run.json must not say "running" (the ledger charged the release before the protocol)
                try:
                    self.finish("failed", str(exc) or type(exc).__name__, announce=False)
                finally:
                    raise exc  # the protocol's error, also if writing the run's end failed too
        bar = tqdm(range(first_round, cfg.rounds + 1), desc="rounds", unit="round", initial=first_round - 1, total=cfg.rounds)
        for round_num in bar:
            if why := self.no_round_can_succeed():
                status, reason = "stopped", why
                if round_num > first_round:
                    self.checkpoint(round_num - 1, last=True)
                break
            outcome = self.run_round(round_num)
            eps = self.ledger.data["guarantee"].get("epsilon")
            bar.set_postfix(eps=f"{eps:.2f}" if eps is not None else "no DP", sites=outcome)
            if not self.active_nodes():
                status, reason = "completed", f"every site exhausted its budget or was excluded by round {round_num}"
                self.checkpoint(round_num, last=True)
                break
            if self.failed_rounds >= MAX_FAILED_ROUNDS:
                status, reason = "stopped", f"fewer than --min-clients valid replies for {MAX_FAILED_ROUNDS} rounds in a row; resume with --resume {self.folder.root} (deployed: --run-config \"resume-from='{self.folder.root}'\")"
                self.checkpoint(round_num, last=True)
                break
        self.finish(status, reason)
        return self.folder.root

    def discover_sites(self) -> dict[int, dict[str, Any]]:
        """Wait for the sites to connect, then ask each for its public facts."""
        deadline = time.monotonic() + self.cfg.round_timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.cfg.clients and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if not nodes:
            raise FedPGGANError(f"no site connected within --round-timeout {self.cfg.round_timeout}s; start the SuperNodes first")
        config = ConfigRecord(self.cfg.to_flower())
        messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type="query", ttl=self.cfg.round_timeout)
                    for n in nodes]
        sites, failures = {}, []
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        sent = destinations(messages)
        for reply in replies:
            node = answering_node(reply, sent)
            problem = ((site_error(reply, 160) or "failed with an error that has no message") if reply.has_error()
                       else site_facts_problem(reply.content))
            if problem:  # a failed, broken or hostile site: left out of the run, named
                failures.append(f"node {node}: {problem}")
                print(f"warning: {failures[-1]}")
                continue
            sites[node] = dict(reply.content["site"])
        if not sites:
            first = failures[0] if failures else f"no answer within --round-timeout {self.cfg.round_timeout}s"
            raise FedPGGANError(f"no site could describe its data ({first}); fix what the sites report "
                                "(a data path: 'fedpggan site check')")
        by_id: dict[str, list[int]] = {}
        for node, facts in sites.items():
            by_id.setdefault(str(facts["site-id"]), []).append(node)
        if twice := sorted(site for site, nodes in by_id.items() if len(nodes) > 1):
            raise FedPGGANError(f"site id {twice[0]!r} is used by {len(by_id[twice[0]])} SuperNodes (nodes "
                                f"{', '.join(map(str, by_id[twice[0]]))}); give each site its own site-id (a copied site.toml?)")
        shapes: dict[tuple, list[str]] = {}
        for facts in sites.values():
            shapes.setdefault((facts["image-size"], facts["channels"], tuple(facts["class-names"])), []).append(str(facts["site-id"]))
        if len({bool(f["is-medical"]) for f in sites.values()}) > 1:  # the run's datasheet says one or the other
            raise FedPGGANError("sites disagree on whether their data are medical (phantom data beside patient data?); "
                                "give every site data of one kind")
        if len(shapes) > 1:
            kinds = "; ".join(f"{', '.join(sorted(ids))}: {size} px, {channels} channel(s), classes {list(names)}"
                              for (size, channels, names), ids in sorted(shapes.items(), key=lambda kv: sorted(kv[1])))
            raise FedPGGANError(f"sites disagree on image size / channels / classes ({kinds}); give every site data of one kind")
        if len(sites) < max(self.cfg.min_clients, 1):  # before any site is charged for rounds that could not succeed
            raise FedPGGANError(f"{len(sites)} site(s) answered, fewer than --min-clients {self.cfg.min_clients}; start more "
                                "SuperNodes or lower --min-clients")
        return sites

    def site_id(self, node: int) -> str:
        return str(self.sites[node]["site-id"])

    def start(self, facts: dict[str, Any]) -> int:
        cfg = self.cfg
        self.run_id = self.folder.root.resolve().name  # the folder's own name, also for --out .
        self.ledger = PrivacyLedger(self.run_id, cfg.dp, library_versions(),
                                    f"{mechanism_name(cfg.grad_sample_mode)} at each site" if cfg.dp else "none", cfg.to_flower(),
                                    [aggregation_assumption(cfg.aggregation),
                                     *([SECURE_SUM_ASSUMPTION] if cfg.dp and cfg.release_aggregation == "secure" else [])],
                                    cfg.noise_key)
        for node, site in self.sites.items():
            if cfg.dp:
                sigma, q, delta, release = self.mechanism_for(int(site["num-records"]))
                self.ledger.register_site(
                    self.site_id(node), budget_epsilon=cfg.epsilon, delta=delta, accountant=cfg.accountant,
                    noise_multiplier=sigma, sample_rate=q, max_grad_norm=cfg.max_grad_norm,
                    planned_steps=cfg.rounds * cfg.local_steps, public_num_records=int(site["num-records"]),
                    feature_release=None if release is None else self.release_record(int(site["num-records"]), len(self.sites), len(self.sites)))
            else:
                self.ledger.register_site(self.site_id(node), public_num_records=int(site["num-records"]))
        self.run_info = {
            "run_id": self.run_id, "kind": "federated", "config": cfg.to_flower(),
            "dataset": {"name": run_dataset_name(common_public_name(str(s["dataset"]) for s in self.sites.values()),
                                                 bool(facts["is-medical"])),
                        "is_medical": bool(facts["is-medical"]), "num_classes": len(self.class_names),
                        "class_names": self.class_names, "image_size": int(facts["image-size"]),
                        "channels": int(facts["channels"]),
                        "num_records": sum(int(s["num-records"]) for s in self.sites.values())},
            "num_sites": len(self.sites), "sites": {self.site_id(n): int(s["num-records"]) for n, s in self.sites.items()},
            "versions": library_versions(), "seed": cfg.seed, "started": now_iso(), "status": "running",
        }
        self.folder.save_ledger(self.ledger, self.run_info)
        if not facts["is-medical"]:
            print("warning: this run uses 'phantom', procedurally generated data: NOT medical data")
        if cfg.dp and cfg.noise_key == "seed":
            print(SEEDED_NOISE_WARNING)
        small = [f"{self.site_id(n)} ({s['num-records']} images)" for n, s in self.sites.items() if int(s["num-records"]) <= cfg.batch_size]
        if cfg.dp and small and len(small) < len(self.sites):
            print(f"warning: site(s) {', '.join(small)} hold no more than --batch-size {cfg.batch_size} images: each DP step "
                  "takes all of them (no sampling amplification), so their discriminators are far noisier than the others'"
                  + ("" if cfg.aggregation == "weighted" else
                     f"; --aggregation {cfg.aggregation} gives them a full site's say (--aggregation weighted counts each site by its size)"))
        if (per_round := sites_per_round(cfg.fraction, len(self.sites))) < ROBUST_MIN_UPDATES:
            print(f"warning: {per_round} site(s) per round: with fewer than {ROBUST_MIN_UPDATES} updates a round, "
                  f"--aggregation median and trimmed-mean are the mean and the 10x-median check is off, so nothing bounds a "
                  "hostile update below 2x the model's norm")
        return 1

    def release_record(self, num_records: int, share_made_for: int, sites: int) -> dict[str, Any]:
        """The ledger's entry for the release of a site of this (public) size; a secure one also
        states what its guarantee assumes, the number of ``sites`` in the sum, its own share's
        noise (made for a sum over ``share_made_for`` sites: the least noisy share it sends) and
        what is left of it if the server and every other site collude (one accountant call per
        site size and N)."""
        sigma, q, delta, release = self.mechanism_for(num_records)
        record: dict[str, Any] = dict(zip(("noise_multiplier", "sample_rate", "steps"), release_entry(release)))
        if self.cfg.release_aggregation == "secure":
            worst = self.collusion_epsilon
            if (num_records, share_made_for) not in worst:
                worst[num_records, share_made_for] = epsilon_if_all_other_sites_collude(
                    release, share_made_for, (sigma, q, self.cfg.rounds * self.cfg.local_steps), delta, self.cfg.accountant)
            record.update(aggregation="secure", sites=sites, share_made_for=share_made_for,
                          share_noise_multiplier=release_share_noise(release, share_made_for), assumption=SECURE_SUM_ASSUMPTION,
                          epsilon_if_all_other_sites_collude=worst[num_records, share_made_for])
        return record

    def mechanism_for(self, num_records: int) -> Mechanism:
        """(sigma, q, delta, release sigma) a site of this (public) size must use; the server checks
        replies against it, so a site reporting a spend inconsistent with the config is excluded."""
        if num_records not in self.expected_mechanism:
            self.expected_mechanism[num_records] = site_mechanism(self.cfg, num_records, self.cfg.rounds * self.cfg.local_steps)
        return self.expected_mechanism[num_records]

    def restore(self) -> int:
        """Continue from the newest verified checkpoint (a corrupt one falls back to the previous).

        The ledger on disk, not a snapshot in the checkpoint, says what was spent: a round recorded
        after the checkpoint was charged at its sites, and stays charged when it is redone
        (PrivacyLedger.resume_after; a site given the same inputs replays its reply without a new charge)."""
        self.run_info = self.folder.read_run()
        refuse_completed(self.folder.root, self.run_info)
        for key, kind in (("run_id", str), ("sites", dict)):  # what the resumed rounds read from it
            if not isinstance(self.run_info.get(key), kind):
                raise FedPGGANError(f"{self.folder.run_json}: has no '{key}' {kind.__name__}; restore run.json from a backup "
                                    "of the run folder")
        recorded = self.folder.read_verified_ledger(self.run_info, "a resume")  # never build on a lost spend record
        path, entry = self.folder.latest_checkpoint()
        payload = load_checkpoint(path, self.gan)
        self.g_trainer.load_state_dict(payload["generator_optim"])
        self.run_id = self.run_info["run_id"]
        self.ledger = PrivacyLedger.load(recorded)
        resumed_at = now_iso()
        self.ledger.resume_after(int(entry["round"]), resumed_at)
        self.failed_rounds = 0  # a resume is the operator's answer to failed rounds: they count afresh
        self.check_sites_match_ledger()
        self.releases = {site: released.double() for site, released in payload.get("releases", {}).items()}
        if self.releases:
            self.use_pooled_releases()
        self.folder.keep_metrics_through(int(entry["round"]), "round")
        self.run_info.update(status="running", resumed_at=resumed_at, resumed_from_round=entry["round"],
                             resumed_with=resumed_with(self.cfg, self.run_info))
        self.folder.save_ledger(self.ledger, self.run_info)
        self.folder.discard_checkpoints_after(entry["round"])  # newer files this resume could not use: set aside
        print(f"resuming {self.folder.root} after round {entry['round']} ({path.name})")
        return int(entry["round"]) + 1

    def check_sites_match_ledger(self) -> None:
        """A resumed run's sites must be the ones its ledger registered, with the sizes their
        mechanisms were calibrated for (the site's accountant would otherwise disagree with the ledger)."""
        registered = self.ledger.data["sites"]
        for facts in self.sites.values():
            site, n = str(facts["site-id"]), int(facts["num-records"])
            if site not in registered:
                raise FedPGGANError(f"site {site!r} is not one of this run's sites ({', '.join(sorted(registered))}); "
                                    "resume with the SuperNodes the run started with, or start a new run")
            if n != int(registered[site].get("public_num_records", n)):
                raise FedPGGANError(f"site {site!r} now holds {n} images, {registered[site]['public_num_records']} when the run "
                                    "began; restore its data (the noise was calibrated for that size) or start a new run")

    def choose_generator_steps(self) -> int:
        """--g-steps, or for 0 the steps the averaged discriminator's DP noise allows (computed from the
        public sizes of the sites the ledger registered, and the config); printed, and recorded in run.json.
        A resumed run keeps what it began with: other steps would change every redone round's inputs, so
        its sites would charge those rounds again instead of replaying them."""
        began_with = self.run_info.get("generator_steps")
        if self.resume and isinstance(began_with, dict) and isinstance(began_with.get("per_round"), int):
            return began_with["per_round"]
        noise = None if self.cfg.g_steps else self.averaged_d_noise()  # None: not needed
        steps = self.cfg.generator_steps(noise or 0.0)
        self.run_info["generator_steps"] = {"per_round": steps, "averaged_d_noise": noise,
                                            "chosen_by": "--g-steps" if self.cfg.g_steps else f"--g-steps 0: noise vs {AUTO_G_STEPS_MAX_NOISE}"}
        self.folder.save_ledger(self.ledger, self.run_info)
        if not self.cfg.g_steps:
            print(f"generator steps per round: {steps} (--g-steps 0: the averaged discriminator's DP noise is {noise:.4f}, "
                  f"{'at most' if noise <= AUTO_G_STEPS_MAX_NOISE else 'above'} {AUTO_G_STEPS_MAX_NOISE})")
        return steps

    def averaged_d_noise(self) -> float:
        """fedpggan.privacy.mechanism.run_d_noise of the sites the ledger registered (0 without DP)."""
        sizes = [int(entry["public_num_records"]) for entry in self.ledger.data["sites"].values()]
        return run_d_noise(self.cfg, sizes, self.mechanism_for)

    def no_round_can_succeed(self) -> str | None:
        """Why no round can reach --min-clients valid replies any more (fewer active sites, or fewer
        than --fraction selects), so that no site is charged for one; None while a round can."""
        active = len(self.active_nodes())
        selectable = sites_per_round(self.cfg.fraction, active)
        if active and selectable < self.cfg.min_clients:
            return (f"--fraction {self.cfg.fraction:g} of the {active} active site(s) selects {selectable}, fewer than "
                    f"--min-clients {self.cfg.min_clients} (the others exhausted their budgets or were excluded)")
        return None

    # --- one round ---------------------------------------------------------------------
    def active_nodes(self) -> list[int]:
        return [n for n in self.sites if self.ledger.site(self.site_id(n))["status"] == "active"]

    def select(self, round_num: int) -> list[int]:
        return sample_sites({n: self.site_id(n) for n in self.active_nodes()}, self.cfg.fraction,
                            derived_seed(self.cfg.seed, round_num, SERVER_STREAM))

    def run_round(self, round_num: int) -> str:
        cfg, t0 = self.cfg, time.perf_counter()
        selected = self.select(round_num)
        for node in set(self.active_nodes()) - set(selected):
            self.ledger.record_event(self.site_id(node), round_num, "not_selected", f"--fraction {cfg.fraction}: not sampled this round")
        config = {**cfg.to_flower(), "g-steps": self.g_steps, "round": round_num, "run-id": self.run_id,
                  "site-state-root": str((self.folder.root / "sites").resolve())}
        # the round's time to live: a site back after an outage must not train (and charge) rounds nobody awaits
        messages = [Message(train_content(self.gan, config), dst_node_id=n, message_type="train", group_id=str(round_num),
                            ttl=cfg.round_timeout) for n in selected]
        replies = list(self.grid.send_and_receive(messages, timeout=cfg.round_timeout))
        t_sites = time.perf_counter() - t0
        global_d = {k: v.detach().cpu().clone() for k, v in self.gan.d.state_dict().items()}
        d_states, g_states, counts = self.accept_replies(round_num, selected, replies, global_d, destinations(messages))
        compute = [c for c in (site_compute_seconds(r) for r in replies) if c is not None]
        needed = replies_needed(cfg.min_clients, len(selected))
        t1 = time.perf_counter()
        row: dict[str, Any] = {"round": round_num, "selected": len(selected), "accepted": len(d_states)}
        if len(d_states) >= max(needed, 1):
            self.failed_rounds = 0
            self.gan.d.load_state_dict(aggregate(d_states, cfg.aggregation, counts))
            row.update(self.train_generators(round_num, g_states, counts))
        else:
            self.failed_rounds += 1
            row["skipped"] = f"{len(d_states)} valid replies < {needed} needed"
        t_gen = time.perf_counter() - t1
        events = [{"site": s, "event": e["event"], "reason": e["reason"]} for s, v in self.ledger.data["sites"].items()
                  for e in v["events"] if e["round"] == round_num and e["event"] != "not_selected" and "before_resume" not in e]
        if events:
            row["events"] = events
        row.update(self.privacy_row())
        row.update(t_sites=t_sites, t_server=t_gen, t_round=time.perf_counter() - t0, t_site_compute=compute)
        self.folder.append_metrics(row)
        self.checkpoint(round_num)
        if round_num % cfg.sample_every == 0 or round_num == cfg.rounds:
            eps = row.get("epsilon_max")
            save_sample_grid(self.gan, self.folder.samples / f"round_{round_num:05d}.png", self.class_names,
                             title=f"{self.run_info['dataset']['name']} round {round_num}  "
                                   f"eps={f'{eps:.4g}' if isinstance(eps, (int, float)) else 'not recorded' if self.cfg.dp else 'no DP'}")
        return f"{len(d_states)}/{len(selected)}"

    def accept_replies(self, round_num: int, selected: list[int], replies: list[Message],
                       global_d: dict[str, torch.Tensor], sent: dict[str, int]) -> tuple[list, list, list[int]]:
        """Validate each reply, record its spend, and keep the valid updates, with their sites' public
        record counts (the weights of --aggregation weighted). ``sent``: message id -> node of the round's messages."""
        global_g = generator_arrays(self.gan).to_torch_state_dict()
        valid: list[tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, Message]] = []
        answered = set()
        attributed = [(node, r) for r in replies if (node := answering_node(r, sent)) in selected]
        for node, reply in sorted(attributed, key=lambda nr: self.site_id(nr[0])):  # arrival order varies
            answered.add(node)
            site = self.site_id(node)
            if reply.has_error():
                self.ledger.record_event(site, round_num, "failed", f"site error: {site_error(reply)}")
                continue
            problem = reply_problem(reply.content, self.cfg.dp)
            if problem:  # counted as a failed round: any spend it reserved is unrecorded (the audit says so)
                self.ledger.record_event(site, round_num, "failed", f"unreadable reply: {problem}")
                continue
            status = dict(reply.content["status"])
            privacy = dict(reply.content["privacy"])
            if status["status"] == "exhausted":
                self.ledger.record_event(site, round_num, "budget_exhausted",
                                         "the next round would exceed the site's budget; the site refused to train", "exhausted")
                self.adopt_higher_claim(site, privacy)  # its running total: a round lost in flight may be in it alone
                continue
            problem = self.spend_problem(node, privacy) if self.cfg.dp else None
            if problem:  # its update is discarded, but it was received: what the site says it spent is kept
                self.ledger.record_event(site, round_num, "excluded", f"{problem}; its update was received and discarded "
                                         "(the spend it reported: reported_epsilon, reported_total_steps)", "excluded")
                self.ledger.site(site)["events"][-1].update(reported_epsilon=privacy.get("epsilon"),
                                                            reported_total_steps=privacy.get("total_steps"))
                self.adopt_higher_claim(site, privacy)  # privacy first: what it says it spent counts, its update discarded or not
                continue
            if self.cfg.dp:
                self.ledger.record_round(site, round_num, steps=int(privacy["steps"]),
                                         noise_multiplier=privacy["noise_multiplier"], sample_rate=privacy["sample_rate"],
                                         epsilon=privacy["epsilon"], delta=privacy["delta"], replayed=bool(status.get("replayed")))
            else:
                self.ledger.record_round(site, round_num, steps=int(privacy["steps"]), epsilon=None)
            if status.get("replayed") or status.get("recovered"):
                self.ledger.mark_replayed(site, round_num)  # no new charge: a resume's record of it is in the rounds again
            if status.get("replayed"):
                self.ledger.record_event(site, round_num, "replayed",
                                         "reply re-sent from the site's cache after a restart; spent once, before the crash")
            self.check_unrecorded_spend(site, round_num, privacy)
            if status.get("recovered"):
                self.ledger.record_event(site, round_num, "recovered",
                                         "the round was in flight at a crash: spent once (reserved before training), "
                                         "recomputed with the same seed and inputs")
            try:
                d_state = reply.content["d"].to_torch_state_dict()
                g_state = reply.content["g"].to_torch_state_dict() if "g" in reply.content else None
            except Exception as exc:  # arrays whose bytes decode to no tensor (empty bytes: EOFError), whatever the error
                self.ledger.record_event(site, round_num, "rejected_update", f"weights that do not decode ({exc})")
                continue
            problem = update_problem(d_state, global_d)
            if not problem and self.cfg.generator_training == "local" and g_state is None:
                problem = "no generators in the reply of a --generator-training local round"
            if not problem and g_state is not None:  # local generator training: shapes and finite values
                problem = update_problem(g_state, global_g, max_relative=math.inf)
            if problem:
                self.ledger.record_event(site, round_num, "rejected_update", problem)
                continue
            valid.append((site, d_state, g_state, reply))
        for node in set(selected) - answered:
            self.ledger.record_event(self.site_id(node), round_num, "no_reply", f"no reply within --round-timeout {self.cfg.round_timeout}s")
        problems = outlier_problems([update_norm(d, global_d) for _, d, _, _ in valid])
        if self.cfg.generator_training == "local":  # a locally trained G is averaged too: one site must not own it
            g_problems = outlier_problems([update_norm(g, global_g) for _, _, g, _ in valid])
            problems = [d or (g and f"generators: {g}") for d, g in zip(problems, g_problems)]
        d_states, g_states, counts, released = [], [], [], False
        for (site, d_state, g_state, reply), problem in zip(valid, problems):
            if problem:
                self.ledger.record_event(site, round_num, "rejected_update", problem)
                continue
            released = self.receive_release(site, round_num, reply) or released
            d_states.append(d_state)
            counts.append(int(self.ledger.site(site)["public_num_records"]))
            if g_state is not None:
                g_states.append(g_state)
        if released:  # pooled once the round's replies are in, not after each of them
            self.use_pooled_releases()
        return d_states, g_states, counts

    def adopt_higher_claim(self, site: str, privacy: dict[str, float]) -> None:
        """A site's reported epsilon where it is above the ledger's: a reply the round does not record (a refusal, an
        excluded update) still carries the site's running total, which may hold a round whose reply was lost."""
        entry = self.ledger.site(site)
        reported = finite_or_none(privacy.get("epsilon"))
        if self.cfg.dp and reported is not None and reported > (finite_or_none(entry.get("epsilon")) or 0.0):
            entry["epsilon"] = reported

    def check_unrecorded_spend(self, site: str, round_num: int, privacy: dict[str, float]) -> None:
        """A site that died mid-round and was then sent different inputs charged that round anyway
        (privacy first): its epsilon covers steps no ledger round shows. Say so in the ledger."""
        if not self.cfg.dp or "total_steps" not in privacy:
            return
        entry = self.ledger.site(site)
        recorded = sum(int(r["steps"]) for r in entry["rounds"]) + (1 if entry.get("feature_release") else 0)
        # steps already counted outside the rounds (only unrecorded_spend and spent_before_resume carry a count)
        already = sum(int(e.get("steps", 0)) for e in entry["events"] if spent_outside_rounds(e))
        extra = int(privacy["total_steps"]) - recorded - already
        if extra > 0:
            self.ledger.record_event(site, round_num, "unrecorded_spend",
                                     f"the site's reported epsilon includes {extra} steps no ledger round shows (a round "
                                     "charged before a crash and then re-run with other inputs; counted, privacy first)")
            entry["events"][-1]["steps"] = extra

    def receive_release(self, site: str, round_num: int, reply: Message) -> bool:
        """Keep a site's one-shot embedding release (the generators then match the pooled class means,
        use_pooled_releases); whether a new one was kept."""
        if self.cfg.embedding_weight <= 0 or "embedding" not in reply.content or site in self.releases:
            return False
        if self.cfg.release_aggregation == "secure":  # the target is the secure sum: one site's plain share must not replace it
            self.ledger.record_event(site, round_num, "rejected_release", "a plain embedding release in a run whose releases are summed securely")
            return False
        try:
            released = reply.content["embedding"].to_torch_state_dict()["sum"]
        except Exception as exc:  # as for the weights: a site's bytes must not stop the server
            self.ledger.record_event(site, round_num, "rejected_release", f"an embedding release that does not decode ({exc})")
            return False
        expected = (self.features.dim + 1, len(self.class_names))
        if tuple(released.shape) != expected or not torch.isfinite(released).all():
            self.ledger.record_event(site, round_num, "rejected_release", f"embedding release of shape {tuple(released.shape)} (expected {expected}) or non-finite")
            return False
        problem = release_problem(released.double(), int(self.run_info["sites"][site]), self.release_sigma(site),
                                  self.cfg.embedding_count_share)
        if problem:  # one site's release would otherwise set the target of every class
            self.ledger.record_event(site, round_num, "rejected_release", problem)
            return False
        self.releases[site] = released.double()
        return True

    def use_pooled_releases(self) -> None:
        """The plain releases received so far, pooled (they ride on each site's first round)."""
        pooled = sum(self.releases[s] for s in sorted(self.releases))
        self.use_release(pooled, sum(self.release_sigma(s) ** 2 for s in self.releases), len(self.releases))

    def release_sigma(self, site: str) -> float:
        """The noise multiplier of a site's whole release (public: from its size and the config); 0 without DP."""
        return self.mechanism_for(int(self.run_info["sites"][site]))[3] if self.cfg.dp else 0.0  # also a site not back after --resume

    def use_release(self, pooled: torch.Tensor, noise_variance: float, pooled_sites: int) -> None:
        """The generators match the pooled class means; the gate reads its noise (post-processing). A class whose
        pooled count does not stand out of the noise gets no target and the gate reads the others: its "mean" would
        be noise far outside the data. So is a class no pooled site holds (while the pool lacks some sites' releases:
        --fraction < 1, a failed round, a site left out of the secure sum; or no site at all), and every class at a
        budget too small for the release (e.g. epsilon 0.05)."""
        share, sites = self.cfg.embedding_count_share, len(self.run_info["sites"])  # every site, also those not back after --resume
        means, counts = class_means(pooled, share)
        classes = vouched_classes(counts, share, noise_variance)
        if bool(classes.all()):
            classes = None
        if classes is not None:
            missing = [name for name, ok in zip(self.class_names, classes.tolist()) if not ok]
            print(f"embedding target: class(es) {', '.join(missing)} left out: their counts do not stand out of the noise "
                  f"in the releases of {pooled_sites} of {sites} sites")
        self.g_trainer.match_embedding(self.features, means.to(self.device), self.cfg.embedding_weight,
                                       None if classes is None else classes.to(self.device))
        self.release_noise_ratio = release_noise_ratio(pooled if classes is None else pooled[:, classes], share, noise_variance)

    def secure_release(self) -> None:
        """Every site's release share as one pairwise-masked sum (server/secure_release.py): the
        server never sees a single site's share. Made once before round 1; a resumed run reuses it.
        Sites that fail are left out and the rest start again, down to --min-clients sites."""
        info = self.run_info.setdefault("secure_release", {})
        path = self.folder.secure_release
        if not path.exists() and "sites" in info:  # the sites revealed their seeds once: the sum cannot be made again
            raise FedPGGANError(f"{path}: missing, but this run made its secure sum (run.json); restore the file from a "
                                "backup of the run folder, or start a new run")
        if not path.exists():  # a new run (a resumable one has a checkpoint, made after the sum)
            config = ConfigRecord({**self.cfg.to_flower(), "run-id": self.run_id,
                                   "site-state-root": str((self.folder.root / "sites").resolve())})
            needed = replies_needed(self.cfg.min_clients, len(self.sites))  # a sum of one share still carries sigma
            self.charge_releases([self.site_id(n) for n in self.sites])  # before any site makes its share
            try:
                result = secure_sum(self.grid, {n: self.site_id(n) for n in self.sites}, config,
                                    (self.features.dim + 1, len(self.class_names)), needed, self.cfg.round_timeout)
            except SecureSumFailed as exc:
                self.record_failed_secure_sum(str(exc), exc.made_for)
                raise
            buffer = io.BytesIO()
            torch.save(result.pooled, buffer)
            info.update(sites=result.sites, share_made_for=result.made_for, left_out=result.left_out,
                        sha256=sha256_bytes(buffer.getvalue()))
            self.record_secure_sum(result)  # the ledger first (privacy first): a kill before the file is written
            atomic_write_bytes(path, buffer.getvalue())  # leaves a run whose resume says to start a new one
            self.folder.write_run(self.run_info)
            pooled = result.pooled
        else:
            raw = path.read_bytes()
            if info.get("sha256") not in (None, sha256_bytes(raw)):  # None: a run from before the hash was kept
                raise FedPGGANError(f"{path}: not the secure sum this run made (its SHA-256 differs from run.json's); "
                                    "restore the file from a backup of the run folder")
            pooled = torch.load(io.BytesIO(raw), weights_only=True)
        sites = info["sites"]  # each share carries sigma^2 / len(sites) of its site's release noise
        variance = sum(self.release_sigma(s) ** 2 for s in sites) / len(sites)
        problem = release_problem(pooled.double(), sum(int(self.run_info["sites"][s]) for s in sites), math.sqrt(variance),
                                  self.cfg.embedding_count_share)
        if problem:  # a hostile share: the sum cannot say whose, so no target is taken from it
            raise FedPGGANError(f"secure release: the sum of {len(sites)} sites' shares is not one their records allow "
                                f"({problem}); a site sent a share its records cannot give: start a new run without it")
        self.use_release(pooled, variance, len(sites))

    def record_secure_sum(self, result: SecureSum) -> None:
        """The ledger states, per site, the sum its share went into (or why it was left out), the
        worst case of its least noisy share, and whether it checked the key list against its roster
        (``peer-keys``): only then could the server not have forged the keys its share was masked with."""
        for site, why in result.left_out.items():
            print(f"warning: secure release: site {site} left out ({why})")
        if not self.cfg.dp:
            return
        for site, why in result.left_out.items():
            self.ledger.site(site)["feature_release"]["left_out"] = why
            self.ledger.record_event(site, 0, "left_out_of_secure_release", why)
        for site in result.sites:
            record = self.release_record(int(self.run_info["sites"][site]), result.made_for[site], len(result.sites))
            signers = result.signers[site]
            record.update(key_list={"verified": True, "signers": signers} if signers else
                          {"verified": False, "why": "the site has no peer-keys: it took the server's key list on trust"})
            self.ledger.site(site)["feature_release"] = record
        self.folder.save_ledger(self.ledger, self.run_info)

    def record_failed_secure_sum(self, reason: str, made_for: dict[str, int]) -> None:
        """No sum was made: every site is left out of it (charged all the same, charge_releases), with the
        worst case of the least noisy share it may have sent (made for the first key list it was sent)."""
        if not self.cfg.dp:
            return
        why = f"the secure sum failed: {reason[:300]}"
        for site, records in self.run_info["sites"].items():
            entry = self.ledger.site(site)
            if site in made_for:
                entry["feature_release"] = self.release_record(int(records), made_for[site], len(self.run_info["sites"]))
            entry["feature_release"]["left_out"] = why
            self.ledger.record_event(site, 0, "left_out_of_secure_release", why)
        self.folder.save_ledger(self.ledger, self.run_info)

    def charge_releases(self, sites: list[str]) -> None:
        """Raise each site's ledger epsilon to its release's (spent then, also by a site --fraction never
        selects) and save the ledger. A secure sum charges every site before the protocol starts: a site
        spends its release when it makes its share, so a sum that then fails, or a server killed midway,
        leaves the spend on record (a site left out before making one is charged all the same: an upper bound)."""
        if not self.cfg.dp:
            return
        for site in sites:
            _, _, delta, release = self.mechanism_for(int(self.run_info["sites"][site]))
            entry = self.ledger.site(site)
            entry["epsilon"] = max(entry["epsilon"], epsilon_of(release_history(release), delta, self.cfg.accountant))
        self.folder.save_ledger(self.ledger, self.run_info)

    def spend_problem(self, node: int, privacy: dict[str, float]) -> str | None:
        """Why a site's reported spend does not match what its config dictates (or None)."""
        sigma, q, delta, _ = self.mechanism_for(int(self.sites[node]["num-records"]))
        for name, expected in (("noise_multiplier", sigma), ("sample_rate", q), ("delta", delta)):
            if not math.isclose(float(privacy.get(name, math.nan)), expected, rel_tol=1e-6):
                return f"reported {name}={privacy.get(name)} but the config dictates {expected:.6g}"
        if int(privacy.get("steps", -1)) != self.cfg.local_steps:
            return f"reported steps={privacy.get('steps')} but --local-steps is {self.cfg.local_steps}"
        if float(privacy["epsilon"]) > self.cfg.epsilon * (1 + 1e-6):
            return f"reported epsilon {privacy['epsilon']:.4f} exceeds the budget {self.cfg.epsilon}"
        return None

    def train_generators(self, round_num: int, g_states: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, float]:
        """Server-side generator steps against the aggregated D (no real data involved)."""
        torch.manual_seed(derived_seed(self.cfg.seed, round_num, SERVER_STREAM))
        if self.cfg.generator_training == "local":
            load_generator_state(self.gan, aggregate(g_states, self.cfg.aggregation, counts))
            self.gan.update_ema()
            return {**self.fit_embedding(), **self.fake_score()}
        stats = [self.g_trainer.step(self.cfg.g_batch_size, self.prior) for _ in range(self.g_steps)]
        out = {"g_steps": len(stats), **generator_step_summary(stats)}
        out.update(self.fit_embedding())
        out.update(self.fake_score())
        return out

    def fit_embedding(self) -> dict[str, float]:
        """The round's --embedding-steps (per adversarial step) on the embedding loss alone, when the
        pooled release is clean enough (--embedding-noise-limit); post-processing of the release."""
        if self.g_trainer.embedding is None:
            return {}
        steps = self.g_steps * self.cfg.embedding_steps_at(self.release_noise_ratio)
        for _ in range(steps):
            self.g_trainer.embedding_step(self.cfg.g_batch_size, self.prior)
        return {"embedding_noise_ratio": finite_or_none(self.release_noise_ratio), "embedding_steps": steps}

    @torch.no_grad()
    def fake_score(self) -> dict[str, float]:
        """Mean D probability on EMA fakes: a training curve made of server-side quantities only."""
        images, labels = self.gan.sample(256)
        return {"d_fake_score": float(torch.sigmoid(self.gan.d.eval()(images, labels)).mean())}

    def privacy_row(self) -> dict[str, Any]:
        self.folder.save_ledger(self.ledger, self.run_info)
        sites = self.ledger.data["sites"]
        row = {f"epsilon_site_{s}": finite_or_none(v.get("epsilon")) for s, v in sites.items()} if self.cfg.dp else {}
        row["epsilon_max"] = self.ledger.data["guarantee"]["epsilon"]
        return row

    def checkpoint(self, round_num: int, last: bool = False) -> None:
        """Every --checkpoint-every rounds and at the ``last`` round the run reaches: the resume point
        (weights, optimisers, the sites' plain releases)."""
        written = not round_num % self.cfg.checkpoint_every or round_num == self.cfg.rounds
        if written == last:  # not due, or already written by the round itself
            return
        path = self.folder.checkpoint_path(round_num)
        self.ledger.record_checkpoint(round_num, path.name, "pending")
        sha = save_checkpoint(path, self.gan, generator_optim=self.g_trainer.state_dict(), run_config=self.cfg.to_flower(),
                              round=round_num, releases=dict(self.releases))
        self.ledger.data["checkpoints"][-1]["sha256"] = sha
        self.folder.save_ledger(self.ledger, self.run_info)
        self.folder.record_checkpoint(round_num, sha)  # listed only once the ledger vouches for it

    def finish(self, status: str, reason: str, announce: bool = True) -> None:
        """Write the curves, the guarantee and the run's end into run.json; ``announce`` prints it (an
        error that ends the run prints itself)."""
        rows = self.folder.read_metrics()
        save_curves(rows, "round", CURVE_PANELS, self.folder.curves / "training.png")
        eps_keys = sorted({k for r in rows for k in r if k.startswith("epsilon_site_")})
        if eps_keys:
            save_curves(rows, "round", {"epsilon per site": eps_keys + ["epsilon_max"]}, self.folder.curves / "epsilon.png",
                        y_label="cumulative epsilon", highlight={"epsilon_max": "guarantee (max over sites)"})
        self.ledger.update_guarantee()
        self.run_info.update(status=status, reason=reason, ended=now_iso(), final_epsilon=self.ledger.data["guarantee"]["epsilon"])
        self.folder.save_ledger(self.ledger, self.run_info)
        eps = self.ledger.data["guarantee"]["epsilon"]
        if announce:
            print(f"{status}: {reason}; run folder {self.folder.root}; epsilon (max over sites) = "
                  f"{'no DP' if not self.cfg.dp else 'not recorded (see privacy_ledger.json)' if eps is None else format(eps, '.4g')}")


def sample_sites(sites: dict[int, str], fraction: float, seed: int) -> list[int]:
    """A seeded ``fraction`` (at least one) of the nodes in ``sites`` (node ID -> site ID). Drawn
    over the site IDs, which a restart keeps, so a round redone after --resume selects the same
    sites (Flower draws new node IDs at every start), and as indices: node IDs are unsigned
    64-bit, and numpy would turn IDs above 2**63 into rounded floats."""
    nodes = sorted(sites, key=sites.__getitem__)
    k = sites_per_round(fraction, len(nodes))
    if k >= len(nodes):
        return sorted(nodes)
    picks = np.random.default_rng(seed).choice(len(nodes), size=k, replace=False)
    return sorted(nodes[i] for i in picks)


def site_compute_seconds(reply: Message) -> float | None:
    """The compute time a site reported (for the round's timing breakdown), if it is a number."""
    if reply.has_error() or "status" not in reply.content:
        return None
    value = dict(reply.content["status"]).get("t-compute")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
