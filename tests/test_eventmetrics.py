"""evaluate-events' metrics against a case worked out by hand."""

from __future__ import annotations

import json

import pytest

from audioclf.cli import main
from audioclf.events import Event, write_events
from audioclf.eventmetrics import evaluate_events, table

REFERENCE = [Event("a.wav", 1.0, 3.0, "dog", 1.0), Event("a.wav", 5.0, 6.0, "cat", 1.0)]
# dog: onset 0.1 s late (collar 0.2 s), offset 0.3 s late (collar max(0.2, 20 % of 2 s) = 0.4 s): a hit.
# cat: onset 0.5 s late: a miss and a false alarm.
ESTIMATED = [Event("a.wav", 1.1, 3.3, "dog", 0.9), Event("a.wav", 5.5, 6.0, "cat", 0.6)]


def test_event_and_segment_based_metrics_match_the_hand_computed_case():
    m = evaluate_events(REFERENCE, ESTIMATED)
    # events: 1 hit, 1 miss, 1 false alarm -> P = R = F1 = 0.5; ER = (0 S + 1 D + 1 I) / 2 = 1.0
    assert (m["event_precision"], m["event_recall"], m["event_f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert m["event_error_rate"] == pytest.approx(1.0)
    # 1-s segments of 0-6 s: dog in 1, 2 (estimated 1, 2, 3), cat in 5 (estimated 5): TP 3, FP 1, FN 0
    assert (m["segment_precision"], m["segment_recall"], m["segment_f1"]) == pytest.approx((0.75, 1.0, 6 / 7))
    assert m["segment_error_rate"] == pytest.approx(1 / 3)  # one insertion over 3 active reference segments
    assert m["class_wise"]["dog"]["event_f1"] == 1.0 and m["class_wise"]["cat"]["event_f1"] == 0.0
    assert "event-based" in table(m) and m["n_files"] == 1


def test_a_perfect_list_scores_one_and_equal_scores_give_no_psds():
    m = evaluate_events(REFERENCE, [e._replace(filename="dir/a.wav") for e in REFERENCE])  # matched by base name
    assert m["event_f1"] == 1.0 and m["segment_f1"] == 1.0 and m["event_error_rate"] == 0.0
    assert m["psds1"] is None  # every score is 1.0: no operating points to sweep


def test_psds_rises_when_the_best_scored_events_are_the_right_ones():
    wrong = Event("a.wav", 7.0, 8.0, "dog", 0.2)
    good = evaluate_events(REFERENCE, [REFERENCE[0]._replace(score=0.9), REFERENCE[1]._replace(score=0.8), wrong])
    assert good["psds1"] is not None and 0.0 <= good["psds1"] <= 1.0
    bad = evaluate_events(REFERENCE, [REFERENCE[0]._replace(score=0.1), REFERENCE[1]._replace(score=0.1),
                                      wrong._replace(score=0.9)])
    assert good["psds1"] >= bad["psds1"]


def test_the_command_prints_a_table_and_writes_json(tmp_path, capsys):
    write_events(REFERENCE, tmp_path / "ref.tsv")
    write_events(ESTIMATED, tmp_path / "est.tsv")
    assert main(["evaluate-events", str(tmp_path / "ref.tsv"), str(tmp_path / "est.tsv"), "--out",
                 str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "event-based" in out and "0.500" in out
    assert json.loads((tmp_path / "m.json").read_text())["segment_f1"] == pytest.approx(6 / 7)


def test_a_missing_file_is_one_clear_error(tmp_path, capsys):
    assert main(["evaluate-events", str(tmp_path / "nope.tsv"), str(tmp_path / "nope.tsv")]) == 2
    assert "nope.tsv: cannot read the event list" in capsys.readouterr().err


def test_psds_leaves_out_classes_the_reference_never_has():
    extra = Event("a.wav", 2.0, 2.5, "siren", 0.7)  # a class with no reference event: an insertion, no PSDS class
    m = evaluate_events(REFERENCE, ESTIMATED + [extra])
    assert m["psds1"] is not None and m["event_precision"] == pytest.approx(1 / 3)
