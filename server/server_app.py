"""The fedpggan ServerApp: owns G1/G2, aggregates D, trains the generators, keeps the ledger.

``flwr run .`` and a SuperLink deployment use the module-level ``app``, configured by
Flower's run config (``[tool.flwr.app.config]`` / ``--run-config``; ``resume-from`` names a run
folder to continue instead); the simulation runner builds its own with :func:`make_server_app`
so it can pass a resolved config directly.
"""

from __future__ import annotations

import warnings

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpggan.config import RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.runs import config_to_resume
from server.federated_run import FederatedRun


def make_server_app(cfg: RunConfig | None = None, resume: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        warnings.filterwarnings("ignore", module="opacus")
        run_config = dict(context.run_config)
        resume_from = str(run_config.pop("resume-from", ""))  # a deployed run continued after a stop or crash
        run_cfg = cfg or (resumed_config(resume_from, run_config) if resume_from else RunConfig.from_flower(run_config))
        FederatedRun(grid, run_cfg, resume=resume or bool(resume_from)).run()

    return app


def resumed_config(resume_from: str, run_config: dict) -> RunConfig:
    """The options of the run in ``resume_from``; other options given with it are refused, since
    a resumed run keeps its own. Flower sends every option, so "given" means "not fedpggan's
    default": an option set to its default passes unnoticed (and is ignored), and a pyproject
    whose [tool.flwr.app.config] defaults were edited has those edits refused here."""
    defaults = RunConfig().to_flower()
    if given := sorted(k for k, v in run_config.items() if k in defaults and v != defaults[k]):
        raise FedPGGANError(f"resume-from continues {resume_from} with its own configuration; drop {given[0]} from "
                            "--run-config (start a new run to change options)")
    return config_to_resume(resume_from)


app = make_server_app()
