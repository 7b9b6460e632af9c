"""``fedpggan site check --config FILE``: what a hospital's IT runs before its site joins.

It checks the site configuration, the images, the coordinator's CA certificate, the node
key, the privacy budget and the state directory, then prints what will and will not leave
the site and the exact ``flower-supernode`` command. Exit 0: ready; 2: a problem (one line).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedpggan.site_config import SiteConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="hospital site tools: 'site check' validates a site before it joins",
                       description="Tools for a hospital site of a federated deployment.")
    actions = p.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="validate a site configuration before joining",
        description="Validate the site configuration (see deploy/site.example.toml): data, CA certificate, node "
                    "key, privacy budget and state directory; print what leaves the site and the SuperNode command.")
    check.add_argument("--config", required=True, metavar="FILE", help="the site's TOML configuration")
    check.add_argument("--insecure", action="store_true",
                       help="allow a config without superlink.root-certificates, and then an environment without the "
                            "import guard (local tests only: traffic to the coordinator is then NOT encrypted)")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedpggan.errors import FedPGGANError
    from fedpggan.site_check import LEAVES, STAYS, check_code_guard
    from fedpggan.site_config import load_site_config

    site = load_site_config(args.config, insecure=args.insecure)
    # this Python environment's, not the config file's; optional only in a local test, without TLS
    code_line, code_warnings = check_code_guard(insecure=args.insecure and site.root_certificates is None)
    try:
        lines, warnings, public_key = check_site(site)
        command = site.supernode_command_line()  # before "ready": a value it cannot quote is refused here
    except FedPGGANError as exc:  # every problem names the config file it is to be fixed in
        raise (exc if str(exc).startswith("--config") else FedPGGANError(f"--config {site.path}: {exc}")) from None

    lines.append(("code run", code_line))
    warnings += code_warnings
    print(f"site {site.site_id}: ready to join {site.superlink}")
    for label, line in lines:
        print(f"  {label:<15}{line}")
    print("will leave this site:\n" + "".join(f"  - {item}\n" for item in LEAVES), end="")
    print("will NOT leave this site:\n" + "".join(f"  - {item}\n" for item in STAYS), end="")
    print(f"send this public key to the coordinator (flwr supernode register):\n  {public_key}")
    print(f"start the site with:\n  {command}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def check_site(site: SiteConfig) -> tuple[list[tuple[str, str]], list[str], str]:
    """Run every check of the site config: (report lines, warnings, the node's public key to register)."""
    from fedpggan.site_check import (check_budget, check_ca_certificate, check_data, check_device,
                                     check_lifetime_left, check_peer_keys, check_private_key, check_spend_journal,
                                     check_state_dir)

    warnings = []
    if site.root_certificates is None:
        warnings.append("--insecure: no CA certificate; the SuperNode will talk to the coordinator WITHOUT TLS. "
                        "Never use this across a hospital boundary")
        cert_line = "none (--insecure)"
    else:
        cert_line, cert_warnings = check_ca_certificate(site.root_certificates)
        warnings += cert_warnings
    public_key = check_private_key(site.auth_private_key)
    peers_line = check_peer_keys(site)
    data, data_line = check_data(site)
    budget_line, budget_warnings = check_budget(site, len(data))
    state_line = check_state_dir(site.state_dir)
    journal_line, journal_warnings = check_spend_journal(site)
    lifetime_line, lifetime_warnings = check_lifetime_left(site)
    warnings += budget_warnings + journal_warnings + lifetime_warnings
    lines = [("data", data_line), ("budget", budget_line), ("state dir", state_line), ("spend journal", journal_line),
             ("lifetime", lifetime_line), ("device", check_device(site)), ("CA certificate", cert_line),
             ("node key", str(site.auth_private_key)), ("peer keys", peers_line)]
    return lines, warnings, public_key
