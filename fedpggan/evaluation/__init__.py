"""Evaluation suite (``fedpggan evaluate``): utility (TSTR vs TRTR), fidelity and diversity in
the feature space of a classifier trained on real data, and memorisation (distance to
closest record). The lower-level pieces are public so benchmarks can reuse them, e.g. the
TRTR reference and a direct DP-SGD classifier: ``trtr(train, test, privacy=ClassifierPrivacy(1.0))``.
"""

from fedpggan.evaluation.classifier import ClassifierPrivacy, SmallCNN, TrainingBudget, embed, train_classifier
from fedpggan.evaluation.fidelity import (COLLAPSE_THRESHOLD, class_diversity, frechet_distance, label_fidelity,
                                          prdc_scores)
from fedpggan.evaluation.dcr import memorisation, nearest_distance
from fedpggan.evaluation.scores import classification_scores, evaluate_classifier
from fedpggan.evaluation.suite import evaluate_run
from fedpggan.evaluation.utility import scores_over_seeds, synthetic_set, trtr, tstr

__all__ = [
    "COLLAPSE_THRESHOLD", "ClassifierPrivacy", "SmallCNN", "TrainingBudget", "class_diversity",
    "classification_scores", "embed", "evaluate_classifier", "evaluate_run", "frechet_distance",
    "label_fidelity", "memorisation", "nearest_distance", "prdc_scores", "scores_over_seeds", "synthetic_set",
    "train_classifier", "trtr", "tstr",
]
