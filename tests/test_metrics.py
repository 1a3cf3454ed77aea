"""audioclf's metrics, on predictions whose figures are known by hand."""

import numpy as np
import pytest

from audioclf.metrics import classification_metrics, macro_f1


def test_macro_f1_counts_the_classes_in_the_data_or_the_predictions():
    assert macro_f1([0, 0, 1], [0, 0, 1]) == 1.0  # a third class, absent from both, is not a zero
    assert macro_f1([0, 0, 1], [0, 2, 1]) == pytest.approx((2 / 3 + 1 + 0) / 3)  # predicted, absent: a zero


def test_classification_metrics_on_known_predictions():
    labels = ["a", "b", "c", "d"]
    y_true = [0, 0, 1, 0]
    probs = np.array([[.9, .1, 0, 0], [.2, .5, .3, 0], [0, 1, 0, 0], [.1, .2, .3, .4]])  # right, wrong, right, wrong
    m = classification_metrics(y_true, probs, labels)
    assert m["accuracy"] == 0.5 and m["top3_accuracy"] == 0.75 and m["n_clips"] == 4
    assert m["labels"] == ["a", "b", "d"]  # c occurs neither as truth nor as a prediction; d only as a prediction
    assert m["confusion_matrix"] == [[1, 1, 1], [0, 1, 0], [0, 0, 0]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(1 / 3), "f1": 0.5, "support": 3}
