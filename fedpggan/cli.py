"""The ``fedpggan`` command: one sub-command per capability, each in fedpggan/commands/.

Every user-fixable problem is printed as one line (``error: ...``) with a non-zero exit;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from fedpggan import __version__
from fedpggan.errors import FedPGGANError

# Each module defines ``register(subparsers)``, which adds a parser whose ``func`` runs it.
COMMANDS = ("train", "simulate", "export", "audit", "evaluate", "site")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpggan",
        description="Federated, differentially private Parallel-Generator GAN for medical images.",
    )
    parser.add_argument("--version", action="version", version=f"fedpggan {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fedpggan.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: args.func(args), args.debug)


def run_reporting_errors(func, debug: bool) -> int:
    """Run ``func``; turn user errors into one line on stderr and exit code 2."""
    if not debug:
        warnings.filterwarnings("ignore", module="opacus")
    try:
        return int(func() or 0)
    except FedPGGANError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything written so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
