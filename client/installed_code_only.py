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
have installed is refused; so is a submodule that only a bundle's folder of a namespace package holds.
The bundle's files are never executed; its ``pyproject.toml`` still carries the run's configuration,
which the site's own code checks.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import sys
import sysconfig
from importlib.abc import MetaPathFinder
from pathlib import Path
from types import ModuleType
from typing import Sequence


def bundle_roots() -> tuple[Path, ...]:
    """Where a SuperNode unpacks app bundles, and where it would install one's project if runtime dependency
    installation were on (flwr.supercore.utils.get_flwr_home() / "apps", / "runtime-envs")."""
    flwr_home = os.environ.get("FLWR_HOME")
    here = None if flwr_home is None or os.path.isabs(flwr_home) else os.getcwd()  # a relative one moves with the cwd
    return _bundle_roots(flwr_home, os.environ.get("HOME"), here)


@functools.lru_cache(maxsize=8)
def _bundle_roots(flwr_home: str | None, home: str | None, cwd: str | None) -> tuple[Path, ...]:
    root = Path(os.path.abspath(os.path.join(cwd or "", flwr_home or Path.home() / ".flwr")))
    return root / "apps", root / "runtime-envs"


def in_bundle(location: str | None) -> bool:
    """Whether ``location`` lies in a bundle folder; asked for every import, so a string comparison."""
    if location is None:
        return False
    path = os.path.abspath(location or ".")
    return any(path == str(root) or path.startswith(str(root) + os.sep) for root in bundle_roots())


def from_bundle(spec: importlib.machinery.ModuleSpec) -> bool:
    return in_bundle(spec.origin) or any(in_bundle(p) for p in spec.submodule_search_locations or ())


class InstalledCodeOnly(MetaPathFinder):
    """Resolves a top-level module that an app bundle on ``sys.path`` provides through the other finders
    (the site's installation: site-packages, or an editable install's own finder) without the bundle's
    entries, or refuses it; a submodule is looked up in its package's folders outside any bundle."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is not None:
            return self.find_submodule_spec(name, list(path))
        bundles = [e for e in sys.path if in_bundle(e)]
        if not bundles or importlib.machinery.PathFinder.find_spec(name, bundles) is None:
            return None  # nothing to shadow: the usual import
        installed = [e for e in sys.path if not in_bundle(e)]
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(name, installed)
            else:
                spec = finder.find_spec(name, None, target)
            if spec is not None and not from_bundle(spec):
                return spec
        raise refusal(name)

    @staticmethod
    def find_submodule_spec(name: str, path: list[str]) -> importlib.machinery.ModuleSpec | None:
        """A submodule of an installed package is found through its ``__path__``, which holds no bundle folder,
        except for a namespace package (e.g. ``google``, which Flower has imported before it loads the app): its
        ``__path__`` is recomputed from ``sys.path`` and so takes in the bundle's portion of it."""
        bundles = [e for e in path if in_bundle(e)]
        if not bundles:
            return None  # the usual import
        spec = importlib.machinery.PathFinder.find_spec(name, [e for e in path if e not in bundles])
        if spec is not None and not from_bundle(spec):
            return spec
        if importlib.machinery.PathFinder.find_spec(name, bundles) is not None:
            raise refusal(name)
        return None


def refusal(name: str) -> ImportError:
    return ImportError(f"{name}: the coordinator's app bundle provides this module and this site has no installed "
                       "copy of it; a site runs only the fedpggan it installed (deploy/Dockerfile.site)", name=name)


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
