"""fedpggan: federated, differentially private Parallel-Generator GAN for medical images."""

__version__ = "0.1.0"
