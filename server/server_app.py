"""The fedpggan ServerApp: owns G1/G2, aggregates D, trains the generators, keeps the ledger.

``flwr run .`` and a SuperLink deployment use the module-level ``app``, configured by
Flower's run config (``[tool.flwr.app.config]`` / ``--run-config``); the simulation runner
builds its own with :func:`make_server_app` so it can pass a resolved config directly.
"""

from __future__ import annotations

import warnings

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpggan.config import RunConfig
from server.federated_run import FederatedRun


def make_server_app(cfg: RunConfig | None = None, resume: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        warnings.filterwarnings("ignore", module="opacus")
        run_cfg = cfg or RunConfig.from_flower(context.run_config)
        FederatedRun(grid, run_cfg, resume=resume).run()

    return app


app = make_server_app()
