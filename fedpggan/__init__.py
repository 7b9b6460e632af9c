"""fedpggan: federated, differentially private Parallel-Generator GAN for medical images."""

import logging

__version__ = "0.1.0"

# Opacus calls logging.basicConfig() when imported (opacus/utils/module_utils.py), which gives the
# root logger a handler; Flower's logger ("flwr", level DEBUG, its own console handler) propagates
# to it, so every Flower line would be printed twice and its DEBUG lines shown. Flower's own
# handler is the one that should print them.
logging.getLogger("flwr").propagate = False
