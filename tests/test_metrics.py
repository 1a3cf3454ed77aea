"""audioclf's metrics, on predictions whose figures are known by hand: macro-F1, the classification figures,
average precision, mAP, thresholds that maximise F1, multilabel F1, the PR-curve plot."""

import numpy as np
import pytest

from audioclf.metrics import (DEFAULT_THRESHOLD, average_precision, best_thresholds, classification_metrics, macro_f1,
                              mean_average_precision, multilabel_metrics, per_class_table, plot_pr_curves)


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


def test_average_precision_by_hand():
    # class 0: scores rank positive, negative, positive -> precision 1 at recall 1/2, 2/3 at recall 1: AP 5/6
    # class 1: both positives ranked first -> AP 1; class 2: no positive clip -> undefined (NaN)
    y = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]])
    s = np.array([[0.9, 0.8, 0.1], [0.6, 0.7, 0.2], [0.3, 0.1, 0.3]])
    ap = average_precision(y, s)
    assert ap[0] == pytest.approx(5 / 6) and ap[1] == pytest.approx(1.0) and np.isnan(ap[2])
    assert mean_average_precision(y, s) == pytest.approx((5 / 6 + 1) / 2)  # over the classes with a positive


def test_best_thresholds_maximise_f1_and_fall_between_scores():
    y = np.array([[1], [1], [0], [1], [0], [0]])
    s = np.array([[0.9], [0.8], [0.7], [0.6], [0.2], [0.1]])
    # keeping the top 4 (0.6 and up) gives F1 = 2*3/(4+3) = 0.857, the best; the top 2 gives 0.8
    (t,) = best_thresholds(y, s)
    assert 0.2 < t < 0.6 and t == pytest.approx(0.4)
    # no positive: the default stays; perfectly separated: between the two groups
    t = best_thresholds(np.array([[0, 1], [0, 1], [0, 0]]), np.array([[0.9, 0.95], [0.2, 0.9], [0.1, 0.3]]))
    assert t[0] == DEFAULT_THRESHOLD and 0.3 < t[1] < 0.9
    # the chosen thresholds reach the best F1 on the clips they were chosen on
    rng = np.random.default_rng(0)
    y = rng.random((200, 4)) < 0.3
    s = np.clip(y * 0.4 + rng.random((200, 4)) * 0.7, 0, 1)
    tuned = multilabel_metrics(y, s, list("abcd"), best_thresholds(y, s))
    for fixed in (0.3, 0.5, 0.7):
        assert tuned["macro_f1"] >= multilabel_metrics(y, s, list("abcd"), [fixed] * 4)["macro_f1"]


def test_multilabel_metrics_by_hand():
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    s = np.array([[0.8, 0.1, 0.6], [0.2, 0.9, 0.4], [0.6, 0.2, 0.1], [0.7, 0.3, 0.2]])
    m = multilabel_metrics(y, s, ["a", "b", "c"], [0.5, 0.5, 0.5])
    # predictions at 0.5: a on clips 1, 3, 4 (tp 2, fp 1); b on clip 2 (tp 1, fn 1); c on clip 1 (tp 1)
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["f1"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 1) / 3)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))  # tp 4, fp 1, fn 1
    assert m["subset_accuracy"] == pytest.approx(2 / 4)  # clips 1, 2 (clip 3 has a false "a", clip 4 misses "b")
    assert m["per_class"]["a"]["support"] == 2 and m["n_clips"] == 4
    assert m["mAP"] == pytest.approx(1.0)  # in every class the positives outscore the negatives
    assert "a" in per_class_table(m) and per_class_table(m).count("\n") == 4


def test_pr_curves_png(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.random((50, 5)) < 0.3
    s = rng.random((50, 5))
    fig = plot_pr_curves(y, s, [f"class {i}" for i in range(5)], tmp_path / "pr.png", most=3)
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].get_lines()) == 1 + 3  # the micro-average, then the three lowest-AP classes
