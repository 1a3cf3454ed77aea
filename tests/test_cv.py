"""Cross-validation's own arithmetic (the folds themselves train in test_train.py and test_hostile_train.py)."""

import numpy as np

from audioclf.cv import _full_confusion_matrix
from audioclf.metrics import classification_metrics

CLASSES = ["chirp", "noise", "tone"]


def test_folds_with_different_classes_present_add_up_over_all_classes():
    # fold 1 has no "noise" clip and nobody predicts it: its report (evaluate's convention) is 2 x 2
    fold1 = classification_metrics([0, 0, 2], np.eye(3)[[0, 2, 2]], CLASSES)
    assert fold1["labels"] == ["chirp", "tone"] and fold1["confusion_matrix"] == [[1, 1], [0, 1]]
    fold2 = classification_metrics([0, 1, 1, 2], np.eye(3)[[0, 1, 0, 2]], CLASSES)
    full1, full2 = _full_confusion_matrix(fold1, CLASSES), _full_confusion_matrix(fold2, CLASSES)
    assert full1 == [[1, 0, 1], [0, 0, 0], [0, 0, 1]]
    assert (np.array(full1) + np.array(full2)).tolist() == [[2, 0, 1], [1, 1, 0], [0, 0, 2]]
    # a fold written before the report followed evaluate's convention already covers every class
    old = {"labels": CLASSES, "confusion_matrix": full1}
    assert _full_confusion_matrix(old, CLASSES) == full1
