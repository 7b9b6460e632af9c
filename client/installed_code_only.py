"""A site runs its own installed code, never the code in the coordinator's app bundle.

Flower 1.41 ships the app's Python files to every SuperNode in the FAB that ``flwr run`` builds,
unpacks it under ``$FLWR_HOME/apps/`` and puts that folder first on ``sys.path`` before it imports
the ClientApp: every site-side protection (the budget caps, the spend journal, the peer-key check,
what a reply may contain) would then be code the coordinator chose. Flower verifies bundles only
from Flower Hub, which offline sites cannot reach.

This module, imported at interpreter start-up (a ``.pth`` line that ``python -m
client.installed_code_only`` writes into the environment, as deploy/Dockerfile.site does and
``fedpggan site check`` asks for), puts a finder in front of Python's import system: a top-level module the
bundle provides is imported from the site's own installation instead, and one the site does not
have installed is refused. The bundle's files are never executed; its ``pyproject.toml`` still
carries the run's configuration, which the site's own code checks.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import sysconfig
from importlib.abc import MetaPathFinder
from pathlib import Path
from types import ModuleType
from typing import Sequence


def bundle_root() -> Path:
    """Where the SuperNode unpacks app bundles (flwr.supercore.utils.get_flwr_home() / "apps")."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").absolute() / "apps"


def in_bundle(entry: str) -> bool:
    root = bundle_root()
    path = Path(entry or ".").absolute()
    return path == root or root in path.parents


class InstalledCodeOnly(MetaPathFinder):
    """Resolves a top-level module that an app bundle on ``sys.path`` provides from the other
    ``sys.path`` entries (the site's installation) or refuses it; submodules follow their package."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is not None:  # a submodule: found through its (installed) package's __path__
            return None
        bundles = [e for e in sys.path if in_bundle(e)]
        if not bundles or importlib.machinery.PathFinder.find_spec(name, bundles) is None:
            return None  # nothing to shadow: the usual import
        spec = importlib.machinery.PathFinder.find_spec(name, [e for e in sys.path if not in_bundle(e)])
        if spec is None:
            raise ImportError(f"{name}: the coordinator's app bundle provides this module and this site has no installed "
                              "copy of it; a site runs only the fedpggan it installed (deploy/Dockerfile.site)", name=name)
        return spec


PTH_NAME = "fedpggan-installed-code-only.pth"
PTH_LINE = "import client.installed_code_only\n"


def pth_file(site_packages: Path | None = None) -> Path:
    """The .pth file that loads this guard in every Python process of the environment."""
    return Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME


def write_pth(site_packages: Path | None = None) -> Path:
    path = pth_file(site_packages)
    path.write_text(PTH_LINE)
    return path


def install() -> None:
    if not any(isinstance(f, InstalledCodeOnly) for f in sys.meta_path):
        sys.meta_path.insert(0, InstalledCodeOnly())


install()

if __name__ == "__main__":
    print(f"wrote {write_pth()}: every Python process of this environment now imports the site's installed code, "
          "never an app bundle's")
