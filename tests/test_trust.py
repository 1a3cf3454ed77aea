"""Calibration and the unknown rule: temperature fitting, ECE, thresholds, AUROC, the reliability plot."""

import json

import numpy as np
import pytest
import torch

from audioclf.errors import AudioclfError
from audioclf.trust import (SCORES, Rejector, class_means, expected_calibration_error, fit_rejector, fit_temperature,
                            fpr_at_tpr, known_score, plot_reliability, read_trust, reference_embeddings, reliability,
                            roc_auc, score_parts, softmax, trust_keys)


def overconfident(n=2000, classes=5, scale=4.0, seed=0):
    """Logits whose softmax is 'right' at temperature 1/scale... multiplied by ``scale``: overconfident."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, classes))
    p = softmax(true_logits)
    labels = np.array([rng.choice(classes, p=row) for row in p])  # labels drawn from the calibrated model
    return true_logits * scale, labels


def nll(logits, labels, t):
    return torch.nn.functional.cross_entropy(torch.as_tensor(logits) / t, torch.as_tensor(labels)).item()


def test_temperature_fitting_undoes_overconfidence_and_lowers_nll():
    logits, labels = overconfident(scale=4.0)
    t = fit_temperature(logits, labels)
    assert 3.3 < t < 4.8  # the logits were scaled by 4
    assert nll(logits, labels, t) < nll(logits, labels, 1.0) - 0.3
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, t), labels)
    assert after < 0.05 < before


def test_temperature_of_calibrated_logits_stays_near_one():
    logits, labels = overconfident(scale=1.0, seed=1)
    assert 0.85 < fit_temperature(logits, labels) < 1.15


def test_ece_against_a_hand_computed_case():
    # 4 clips, 2 classes. Confidences 0.95 (right), 0.95 (wrong) -> bin (14/15, 1]: acc 0.5, conf 0.95, gap 0.45
    # 0.6 (right), 0.7 (right) -> bins (8/15, 9/15] and (10/15, 11/15]: gaps 0.4 and 0.3
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    want = (2 * 0.45 + 0.4 + 0.3) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(want)
    r = reliability(probs, labels)
    assert sum(r["count"]) == 4 and r["count"][14] == 2 and r["count"][8] == 1 and r["count"][10] == 1
    assert np.isnan(r["accuracy"][0])  # an empty bin


def test_threshold_keeps_the_requested_share_of_known_clips():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1000, 10)) * 3
    for keep in (0.5, 0.9, 0.95, 1.0):
        for kind in ("msp", "energy"):
            r = fit_rejector(kind, keep, logits)
            kept = r.keep(logits).mean()
            assert keep <= kept <= keep + 0.002, (kind, keep, kept)
    with pytest.raises(AudioclfError, match="keep_known"):
        fit_rejector("msp", 0.0, logits)


def test_embedding_score_is_cosine_to_the_nearest_class_mean():
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    means = class_means(emb, [0, 0, 1, 1], 2)
    assert torch.allclose(means.norm(dim=1), torch.ones(2))
    s = known_score("embedding", torch.zeros(3, 2), torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]), means)
    assert s[0] > 0.99 and s[1] < 0 and 0.6 < s[2] < 0.8
    with pytest.raises(AudioclfError, match="score"):
        known_score("distance", torch.zeros(1, 2))


def test_auroc_and_fpr_at_95_tpr():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1], [2, 3]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5  # ties count half
    known = np.arange(100, dtype=float)  # threshold keeping 95 of them: 5
    assert fpr_at_tpr(known, np.array([4.0, 5.0, 50.0, -1.0])) == 0.5


def test_knn_score_is_cosine_to_the_kth_nearest_training_clip():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    refs = reference_embeddings("knn", train, [0, 1, 1, 2], 3)["refs"]
    assert torch.allclose(refs.norm(dim=1), torch.ones(4))
    clips = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    np.testing.assert_allclose(known_score("knn", torch.zeros(2, 3), clips, refs, k=1), [1.0, 0.5 ** 0.5], atol=1e-6)
    # the first clip has two training clips straight above it, the diagonal one three at 45°
    np.testing.assert_allclose(known_score("knn", torch.zeros(2, 3), clips, refs, k=2), [1.0, 0.5 ** 0.5], atol=1e-6)
    np.testing.assert_allclose(known_score("knn", torch.zeros(2, 3), clips, refs, k=3), [0.0, 0.5 ** 0.5], atol=1e-6)
    assert known_score("knn", torch.zeros(1, 3), clips[:1], refs, k=99)[0] == pytest.approx(0.0, abs=1e-6)  # k > n
    assert reference_embeddings("msp", train, [0, 1, 1, 2], 3) == {}


def elongated_classes(n, rng, displaced=0.0):
    """Two classes in 8 dimensions, far from the origin (unit-length embeddings keep their shape), both spread
    along axis 2 (std 2) and tight along the others (std 0.2); ``displaced`` moves the clips along axis 3."""
    means = np.zeros((2, 8))
    means[0, 0] = means[1, 1] = 10.0
    labels = np.arange(n) % 2
    x = means[labels] + rng.normal(size=(n, 8)) * np.array([0.2, 0.2, 2.0, 0.2, 0.2, 0.2, 0.2, 0.2])
    x[:, 3] += displaced
    return x, labels


def test_mahalanobis_ranks_far_clips_lower_and_follows_elongated_classes():
    rng = np.random.default_rng(0)
    train, labels = elongated_classes(400, rng)
    refs = reference_embeddings("mahalanobis", train, labels, 2)
    assert refs["refs"].shape == (2, 8) and refs["precision"].shape == (8, 8)
    score = (lambda kind, x, r: known_score(kind, torch.zeros(len(x), 2), torch.as_tensor(x, dtype=torch.float32),
                                            r["refs"], k=1, precision=r.get("precision")).numpy())
    # moving away from a class mean, along the spread axis or across it, lowers the score
    steps = np.zeros((6, 8))
    steps[:, 0], steps[:, 2] = 10.0, np.arange(6) * 3.0
    assert np.all(np.diff(score("mahalanobis", steps, refs)) < 0)
    known, _ = elongated_classes(200, rng)
    # unknown clips: a step of 1 across the tight axis 3 (5 of its stds), half the known clips' spread along axis 2
    unknown, _ = elongated_classes(200, rng, displaced=1.0)
    cosine = {"refs": class_means(train, labels, 2)}
    maha_auroc = roc_auc(score("mahalanobis", known, refs), score("mahalanobis", unknown, refs))
    cosine_auroc = roc_auc(score("embedding", known, cosine), score("embedding", unknown, cosine))
    assert maha_auroc > 0.95 and cosine_auroc < 0.8, (maha_auroc, cosine_auroc)
    with pytest.raises(AudioclfError, match="mahalanobis.*references"):
        known_score("mahalanobis", torch.zeros(1, 2), torch.zeros(1, 8), refs["refs"])  # no precision


def test_a_sum_of_scores_standardises_each_part_on_the_validation_clips():
    rng = np.random.default_rng(2)
    train, labels = elongated_classes(200, rng)
    val, val_labels = elongated_classes(100, rng)
    logits = 30 * np.eye(2)[val_labels] + rng.normal(size=(100, 2))  # energy ~30, Mahalanobis ~ -8: other scales
    refs = reference_embeddings("energy+mahalanobis", train, labels, 2)
    rule = fit_rejector("energy+mahalanobis", 0.9, logits, val, refs, temperature=1.5)
    assert score_parts(rule.kind) == ("energy", "mahalanobis") and rule.needs_embedding
    parts = rule.part_scores(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(val, dtype=torch.float32))
    for (mean, std), s in zip(rule.standardize, parts):
        assert mean == pytest.approx(s.double().mean().item(), rel=1e-6) and std == pytest.approx(s.double().std(False).item(), rel=1e-5)
    s = rule.score(logits, val)
    assert abs(s.mean()) < 1e-4 and 0.9 <= rule.keep(logits, val).mean() <= 0.92  # the sum of two z-scores
    np.testing.assert_allclose(s, sum((p.numpy() - m) / sd for p, (m, sd) in zip(parts, rule.standardize)), rtol=1e-5, atol=1e-5)
    with pytest.raises(AudioclfError, match="mean and std"):
        Rejector("energy+mahalanobis", 0.0, 0.9, **refs).score(logits, val)  # a sum without its standardisation
    for bad in ("energy+energy", "knn+mahalanobis", "energy+", "entropy"):
        with pytest.raises(AudioclfError, match="score="):
            score_parts(bad)


def test_the_config_offers_the_scores_trust_knows():
    from typing import get_args, get_type_hints

    from audioclf.config import TrainConfig

    assert get_args(get_type_hints(TrainConfig)["reject_score"]) == SCORES
    assert TrainConfig().reject_score in SCORES


@pytest.mark.parametrize("kind", ["embedding", "knn", "mahalanobis", "energy+mahalanobis", "energy+knn"])
def test_rule_round_trips_through_the_saved_keys(kind):
    rng = np.random.default_rng(1)
    logits, emb, labels = rng.normal(size=(50, 4)), rng.normal(size=(50, 8)), np.arange(50) % 4
    refs = reference_embeddings(kind, emb, labels, 4)
    rule = fit_rejector(kind, 0.9, logits, emb, refs, temperature=2.0, k=3)
    t, back = read_trust(json.loads(json.dumps(trust_keys(2.0, rule))))  # as an export's config.json holds them
    assert t == 2.0 and back.kind == kind and back.threshold == rule.threshold
    assert torch.allclose(back.refs, rule.refs, rtol=1e-6, atol=1e-5) and ("knn" not in kind or back.k == 3)
    if "mahalanobis" in kind:
        assert torch.allclose(back.precision, rule.precision, rtol=1e-6)
    assert back.standardize == (rule.standardize if "+" in kind else None)
    np.testing.assert_allclose(back.score(logits, emb), rule.score(logits, emb), rtol=1e-5, atol=1e-4)
    assert read_trust({}) == (1.0, None)  # a model saved before: temperature 1, no rule


def test_reliability_png(tmp_path):
    logits, labels = overconfident(n=300)
    plot_reliability({"before": softmax(logits), "after": softmax(logits, 4.0)}, labels, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rejector_scores_numpy_like_torch():
    r = Rejector("energy", 0.0, 0.95, temperature=2.0)
    z = np.array([[1.0, 2.0, 3.0]])
    assert r.score(z)[0] == pytest.approx(2.0 * np.log(np.exp(0.5) + np.exp(1.0) + np.exp(1.5)), rel=1e-5)


@pytest.mark.parametrize("saved", [{"temperature": 0.0}, {"temperature": float("nan")}, {"temperature": "1"},
                                   {"reject": {"score": "msp", "threshold": None, "keep_known": 0.95}},
                                   {"reject": {"score": "mahalanobis", "threshold": 0.5, "keep_known": 0.95}},
                                   {"reject": {"score": "embedding", "threshold": 0.5, "keep_known": 0.95}},
                                   {"reject": {"score": "knn", "threshold": 0.5, "keep_known": 0.95, "class_means": [[1.0]]}},
                                   {"reject": {"score": "knn", "threshold": 0.5, "keep_known": 0.95, "k": 0,
                                               "train_embeddings": [[1.0]]}},
                                   {"reject": {"score": "msp", "threshold": 0.5, "keep_known": 2}}, {"reject": "msp"}])
def test_a_damaged_saved_rule_is_refused_with_the_model_named(saved):
    with pytest.raises(AudioclfError, match="run/best.pt"):
        read_trust(saved, "run/best.pt")


def saved_sum(**change):
    rng = np.random.default_rng(3)
    emb, labels = rng.normal(size=(40, 4)), np.arange(40) % 2
    kind = "energy+mahalanobis"
    rule = fit_rejector(kind, 0.95, rng.normal(size=(40, 2)), emb, reference_embeddings(kind, emb, labels, 2))
    return {"reject": {**rule.to_dict(), **change}}


@pytest.mark.parametrize("change, key", [({"precision": None}, "precision"), ({"precision": [[1.0, 0.0], [0.0, 1.0]]}, "precision"),
                                         ({"precision": [[1.0] * 4] * 3 + [[1.0] * 3]}, "precision"),
                                         ({"class_means": [[0.1] * 4, [0.2] * 3]}, "class_means"),
                                         ({"class_means": [[0.1, "x", 0.1, 0.1]]}, "class_means"),
                                         ({"standardize": None}, "standardize"), ({"standardize": [[0.0, 1.0]]}, "standardize"),
                                         ({"standardize": [[0.0, 1.0], [0.0, 0.0]]}, "standardize"),
                                         ({"score": "energy+mahalanobis+knn"}, "score"), ({"k": 1.5}, "k")])
def test_a_damaged_sum_names_the_key(change, key):
    read_trust(saved_sum())  # as fitted: fine
    with pytest.raises(AudioclfError, match=rf"best.pt: .*damaged: {key} must"):
        read_trust(saved_sum(**change), "best.pt")


def test_ece_floor_is_what_a_calibrated_model_measures_and_falls_with_more_clips():
    from audioclf.trust import ece_floor, expected_calibration_error

    rng = np.random.default_rng(0)

    def calibrated(n):  # 2 classes; the top class is right with probability its confidence
        conf = rng.uniform(0.5, 1.0, n)
        probs = np.stack([conf, 1 - conf], 1)
        return probs, np.where(rng.random(n) < conf, 0, 1)

    few = [expected_calibration_error(*calibrated(100)) for _ in range(200)]
    probs, _ = calibrated(100)
    floor = ece_floor(probs)
    assert floor["ece_floor"] == pytest.approx(np.mean(few), rel=0.25)  # ECE measured on 100 calibrated clips
    assert floor["ece_floor"] < floor["ece_floor_p95"] < 0.2
    assert ece_floor(calibrated(20000)[0])["ece_floor"] < 0.02 < floor["ece_floor"]
