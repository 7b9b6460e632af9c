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


class OneLineParser(argparse.ArgumentParser):
    """An option error is one line naming the fix, like every other user error (argparse would
    print the whole usage block first). Sub-command parsers inherit the class. Options are never
    abbreviated: an option removed since a command was written must not be read as a longer one it
    prefixes (``--generator`` as ``--generator-training``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse reports an option no sub-command knows from the top parser: point to the command's help."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = [name for dest in ("command", "site_command") if (name := getattr(parsed, dest, None))]
            self.exit(2, f"error: unrecognized arguments: {' '.join(extras)}; see {' '.join([self.prog, *command])} --help\n")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fedpggan",
        description="Federated, differentially private Parallel-Generator GAN for medical images.",
    )
    parser.add_argument("--version", action="version", version=f"fedpggan {__version__}")
    debug_help = "show tracebacks instead of one-line errors"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fedpggan.commands.{name}").register(sub)
    add_debug_after_commands(sub, debug_help)
    return parser


def add_debug_after_commands(sub: argparse._SubParsersAction, debug_help: str) -> None:
    """Accept ``--debug`` after any (sub-)command too; SUPPRESS keeps one given before it."""
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):  # e.g. fedpggan site check
                add_debug_after_commands(action, debug_help)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: args.func(args), args.debug)


INTERRUPTED = ("interrupted: what was saved is kept (checkpoints, the ledger, finished reports); an unfinished "
               "export is removed, an earlier one left as it was")
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a Ctrl-C


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
    except OSError as exc:  # a path that is a file, not writable, a full disk: the user's to fix
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; check that path (a folder where one is expected, "
              "permissions, free space)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
