"""Privacy-budget audit of a run folder (``fedpggan audit RUN``).

Accounting audit: recompute every site's epsilon with three independent accountants and
check the ledger against the config, itself and the files on disk. Empirical audit
(``--mia``): membership-inference attacks on the trained model and the epsilon they prove.
"""

from fedpggan.audit.accountants import ACCOUNTANTS, recompute
from fedpggan.audit.findings import Finding
from fedpggan.audit.mia import MiaOptions, run_mia
from fedpggan.audit.mia_stats import attack_metrics, epsilon_lower_bound
from fedpggan.audit.report import summary
from fedpggan.audit.runner import audit_run

__all__ = ["ACCOUNTANTS", "Finding", "MiaOptions", "attack_metrics", "audit_run", "epsilon_lower_bound",
           "recompute", "run_mia", "summary"]
