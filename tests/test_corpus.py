"""The corpus protocol (vmr/eval/corpus.py, ``vmr eval --protocol tvr``): equal to TVR's official
evaluator on a file made over its val annotations (tests/fixtures/tvr/), equal to a hand computation,
and bad files refused in one line. The training objective and the search it serves are in
test_corpus_search.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmr.cli import main
from vmr.eval.corpus import tvr_metrics
from vmr.eval.metrics import BadInput

FIXTURES = Path(__file__).parent / "fixtures" / "tvr"


def test_the_metrics_equal_the_official_evaluators_on_tvr_val():
    submission = json.loads((FIXTURES / "predictions.json").read_text())
    truth = [json.loads(line) for line in (FIXTURES / "ground_truth.jsonl").read_text().splitlines()]
    official = json.loads((FIXTURES / "official_metrics.json").read_text())
    assert tvr_metrics(submission, truth) == official  # every key, every number, to 2 decimals


def test_the_metrics_equal_a_hand_computation():
    truth = [{"desc_id": 1, "vid_name": "a", "ts": [10, 20], "duration": 60, "type": "v"},
             {"desc_id": 2, "vid_name": "b", "ts": [0, 10], "duration": 30, "type": "t"}]
    submission = {"video2idx": {"a": 0, "b": 1, "c": 2}, "VCMR": [
        # query 1: wrong video first, then its video at IoU 7/10 (right at 0.5 and at 0.7), rank 2
        {"desc_id": 1, "predictions": [[2, 10, 20, 0.9], [0, 10, 17, 0.8]]},
        # query 2: its video at IoU 0.6 (right at 0.5 only) at rank 1
        {"desc_id": 2, "predictions": [[1, 0, 6, 0.9]]}],
        "SVMR": [{"desc_id": 1, "predictions": [[2, 10, 20, 1], [0, 0, 5, 0.5], [0, 12, 20, 0.4]]},
                 {"desc_id": 2, "predictions": [[1, 20, 30, 1]]}],
        "VR": [{"desc_id": 1, "predictions": [[2, 0, 0, 1], [0, 0, 0, 0.5]]},
               {"desc_id": 2, "predictions": [[1, 0, 0, 1]]}]}
    metrics = tvr_metrics(submission, truth)
    assert metrics["VCMR"] == {"0.5-r1": 50.0, "0.5-r5": 100.0, "0.5-r10": 100.0, "0.5-r100": 100.0,
                               "0.7-r1": 0.0, "0.7-r5": 50.0, "0.7-r10": 50.0, "0.7-r100": 50.0}
    # SVMR reads only the query's own video: query 1's [12, 20] (IoU 0.8) is its 2nd own moment.
    assert metrics["SVMR"]["0.5-r1"] == 0.0 and metrics["SVMR"]["0.7-r5"] == 50.0
    assert metrics["VR"] == {"r1": 50.0, "r5": 100.0, "r10": 100.0, "r100": 100.0}
    assert metrics["VCMR_by_type"]["v-0.7-r5"] == 100.0 and metrics["VCMR_by_type"]["t-0.7-r5"] == 0.0
    assert metrics["VCMR_by_type"]["desc_type_ratio"] == "v 50.0 t 50.0 vt 0.0"
    assert metrics["VCMR_by_type"]["vt-0.5-r1"] is None  # no query of that type: no number, not NaN
    # Four or more annotators (DiDeMo's layout): right when 2 of them are matched.
    four = [{"desc_id": 1, "vid_name": "a", "duration": 30, "ts": [[0, 5], [0, 5], [10, 15], [20, 25]]}]
    for span, right in (([0, 5], 100.0), ([10, 15], 0.0)):
        got = tvr_metrics({"video2idx": {"a": 0}, "VCMR": [{"desc_id": 1, "predictions": [[0, *span, 1]]}]}, four)
        assert got["VCMR"]["0.5-r1"] == right and "VCMR_by_type" not in got


@pytest.mark.parametrize("change, reason", [
    (lambda s, t: s["VCMR"][0]["predictions"].append([7, 0, 1, 1]), "video number 7 is not in video2idx"),
    (lambda s, t: s["VCMR"][0].update(predictions=[[0, 0, 1, 1]] * 101), "101 predictions"),
    (lambda s, t: s["VCMR"][0]["predictions"][0].__setitem__(3, float("nan")), "finite"),
    (lambda s, t: s["VCMR"][0]["predictions"][0].__setitem__(1, "zero"), "finite"),
    (lambda s, t: t[0].update(ts=[50, 70]), "not inside the video's duration"),
    (lambda s, t: t[0].update(ts=[[0, 1], [2, 3]]), "at least 4"),
    (lambda s, t: s["VCMR"].pop(), "no predictions for 1 queries"),
    (lambda s, t: s.pop("video2idx"), "video2idx"),
    (lambda s, t: s["video2idx"].pop("a"), "lacks 'a'"),
    (lambda s, t: s["VCMR"].append({"desc_id": 99, "predictions": []}), "not in the ground truth"),
    (lambda s, t: t.append(dict(t[0])), "appears twice"),
    (lambda s, t: s.pop("VCMR"), "answers none"),
])
def test_bad_files_are_one_line_exit_2(change, reason, tmp_path, capsys):
    truth = [{"desc_id": 1, "desc": "a red circle", "vid_name": "a", "ts": [10, 20], "duration": 60}]
    submission = {"video2idx": {"a": 0, "b": 1}, "VCMR": [{"desc_id": 1, "predictions": [[0, 10, 20, 0.5]]}]}
    with pytest.raises(BadInput):
        change(submission, truth)
        tvr_metrics(submission, truth)
    (tmp_path / "p.json").write_text(json.dumps(submission))
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    capsys.readouterr()
    assert main(["eval", "--protocol", "tvr", "--predictions", str(tmp_path / "p.json"),
                 "--ground-truth", str(tmp_path / "g.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err, err


def test_eval_prints_and_writes_the_official_layout(tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--protocol", "tvr", "--predictions", str(FIXTURES / "predictions.json"),
                 "--ground-truth", str(FIXTURES / "ground_truth.jsonl"), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "| VCMR | 0.5 |" in out and "| VR | - |" in out
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((FIXTURES / "official_metrics.json").read_text())
    assert main(["eval", "--protocol", "tvr", "--predictions", str(FIXTURES / "predictions.json")]) == 2
