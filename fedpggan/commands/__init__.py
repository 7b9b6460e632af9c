"""Sub-commands of the ``fedpggan`` CLI (see fedpggan/cli.py)."""
