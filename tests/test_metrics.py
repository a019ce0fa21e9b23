"""Evaluation protocols on hand-computed cases, property tests on span math, and `vmr eval` on files."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmr.cli import main
from vmr.eval.metrics import (
    BadInput,
    compute_comprehensive_metrics,
    detection_ap,
    evaluate,
    ranking_ap,
)
from vmr.eval.report import evaluate_groups, leaderboard
from vmr.spans import iou, nms

THRESHOLDS = ["0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"]


def gt_row(qid, windows, duration=60, clips=None):
    row = {"qid": qid, "query": f"q{qid}", "vid": f"v{qid}", "duration": duration, "relevant_windows": windows}
    if clips is not None:
        row["relevant_clip_ids"] = [c for c, _ in clips]
        row["saliency_scores"] = [s for _, s in clips]
    return row


def pred_row(qid, windows, saliency=None):
    row = {"qid": qid, "query": f"q{qid}", "vid": f"v{qid}", "pred_relevant_windows": windows}
    if saliency is not None:
        row["pred_saliency_scores"] = saliency
    return row


def test_perfect_predictions_score_100():
    gt = [gt_row(1, [[0, 6]], duration=10, clips=[(0, [4, 4, 4]), (1, [3, 3, 3]), (2, [2, 2, 2])]),
          gt_row(2, [[12, 46]], duration=50, clips=[(c, [4, 4, 4]) for c in range(6, 23)]),
          gt_row(3, [[2, 14], [30, 50]], duration=60, clips=[(c, [4, 4, 4]) for c in [*range(1, 7), *range(15, 25)]])]
    preds = []
    for row in gt:
        saliency = [0.0] * int(row["duration"] / 2)
        for c, scores in zip(row["relevant_clip_ids"], row["saliency_scores"], strict=True):
            saliency[c] = sum(scores) / 3
        preds.append(pred_row(row["qid"], [[s, e, 1.0 - i * 0.1] for i, (s, e) in enumerate(row["relevant_windows"])],
                              saliency))
    metrics, missing = evaluate(preds, gt)
    assert missing == 0
    assert list(metrics) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood", "full", "long", "middle",
                             "short", "clip_level"]
    for name in ("full", "long", "middle", "short"):
        assert list(metrics[name]["MR-R1"]) == THRESHOLDS
        assert set(metrics[name]["MR-R1"].values()) == {100.0}
        assert set(metrics[name]["MR-mAP"].values()) == {100.0}
    for level in ("Fair", "Good", "VeryGood"):
        assert metrics[f"HL-min-{level}"] == {"HL-mAP": 100.0, "HL-Hit1": 100.0}
    assert metrics["brief"]["MR-full-R1@0.7"] == 100.0 and metrics["brief"]["HL-min-VeryGood-Hit1"] == 100.0
    assert list(metrics["brief"])[:8] == sorted(list(metrics["brief"])[:8])  # official: MR keys sorted


def test_r1_uses_the_first_window_and_the_best_matching_ground_truth():
    gt = [gt_row(1, [[0, 10], [20, 30]]), gt_row(2, [[0, 10]])]
    # qid 1: first window [21, 30] overlaps the second GT window by 0.9; qid 2: [5, 15], IoU 1/3.
    preds = [pred_row(1, [[21, 30, 0.9], [0, 10, 0.1]]), pred_row(2, [[5, 15, 0.9], [0, 10, 0.5]])]
    r1 = evaluate(preds, gt)[0]["full"]["MR-R1"]
    assert [r1[t] for t in THRESHOLDS] == [50.0] * 9 + [0.0]


def test_map_with_several_predictions_on_one_ground_truth_window():
    # Both hit [0, 10]; only the first counts, the second is a false positive after it: AP 1.
    assert detection_ap([[0, 10]], [[0, 10, 0.9], [0, 10, 0.8]]).tolist() == [1.0] * 10
    # A miss first, then a hit: precision 1/2 at recall 1.
    assert detection_ap([[0, 10]], [[20, 30, 0.9], [0, 10, 0.8]]).tolist() == [0.5] * 10
    # Two GT windows; the second prediction overlaps a taken one (fp), the third finds the other:
    # precision (1, 1/2, 2/3) at recall (1/2, 1/2, 1) -> 1/2 * 1 + 1/2 * 2/3.
    ap = detection_ap([[0, 10], [20, 30]], [[0, 10, 0.9], [1, 10, 0.8], [20, 30, 0.7]])
    assert ap == pytest.approx([0.5 + 1 / 3] * 10)
    # Scores decide the order, not the file's order.
    assert detection_ap([[0, 10]], [[0, 10, 0.8], [20, 30, 0.9]]).tolist() == [0.5] * 10


def test_map_uses_only_the_top_10_windows():
    gt = [gt_row(1, [[50, 60]])]
    windows = [[i, i + 1, 1.0 - i / 100] for i in range(10)] + [[50, 60, 0.01]]
    assert evaluate([pred_row(1, windows)], gt)[0]["full"]["MR-mAP"]["average"] == 0.0
    assert evaluate([pred_row(1, windows[-2:])], gt)[0]["full"]["MR-mAP"]["average"] == 50.0


def test_length_ranges_keep_windows_in_range():
    gt = [gt_row(1, [[0, 5], [20, 60]]), gt_row(2, [[0, 20]])]
    preds = [pred_row(1, [[20, 60, 0.9]]), pred_row(2, [[0, 20, 0.9]])]
    metrics = evaluate(preds, gt)[0]
    assert metrics["long"]["MR-R1"]["0.5"] == 100.0  # only qid 1's 40-s window is long
    assert metrics["middle"]["MR-R1"]["0.5"] == 100.0  # only qid 2
    assert metrics["short"]["MR-R1"]["0.5"] == 0.0  # qid 1's [0, 5] against its first window
    assert metrics["full"]["MR-mAP"]["average"] == 75.0  # qid 1: 1 of 2 windows found (AP 0.5)


def test_highlight_hit_and_map_by_hand():
    # 4 clips; clip 1 VeryGood, clip 2 Fair. The top-scored clip is 2.
    gt = [gt_row(1, [[2, 6]], duration=8, clips=[(1, [4, 4, 4]), (2, [2, 2, 2])])]
    metrics = evaluate([pred_row(1, [[2, 6, 1.0]], [0.1, 0.5, 0.9, 0.2])], gt)[0]
    assert metrics["HL-min-Fair"] == {"HL-mAP": 100.0, "HL-Hit1": 100.0}
    assert metrics["HL-min-Good"] == {"HL-mAP": 50.0, "HL-Hit1": 0.0}
    assert metrics["HL-min-VeryGood"] == {"HL-mAP": 50.0, "HL-Hit1": 0.0}


def test_ranking_ap_ties_and_constant_labels():
    import numpy as np

    assert ranking_ap(np.array([0.0, 0.0]), np.array([0.3, 0.2])) == 0.0
    assert ranking_ap(np.array([1.0, 1.0]), np.array([0.3, 0.2])) == 1.0
    # A tie between a positive and a negative: one threshold level with precision 1/2.
    assert ranking_ap(np.array([1.0, 0.0, 0.0]), np.array([0.5, 0.5, 0.1])) == 0.5


def test_order_of_lines_does_not_matter():
    rng = random.Random(0)
    gt, preds = [], []
    for qid in range(30):
        start = rng.uniform(0, 100)
        gt.append(gt_row(qid, [[start, start + rng.uniform(2, 45)]], duration=150,
                         clips=[(c, [rng.randint(0, 4) for _ in range(3)]) for c in range(3, 9)]))
        preds.append(pred_row(qid, [[s, s + rng.uniform(1, 40), rng.random()] for s in
                                    (rng.uniform(0, 100) for _ in range(5))], [rng.random() for _ in range(75)]))
    first = evaluate(preds, gt)[0]
    rng.shuffle(gt)
    rng.shuffle(preds)
    assert json.dumps(evaluate(preds, gt)[0], sort_keys=True) == json.dumps(first, sort_keys=True)


def test_charades_protocol_by_hand():
    gt = [gt_row(1, [[0, 10]]), gt_row(2, [[0, 10]])]
    preds = [pred_row(1, [[0, 8, 0.9]]),  # IoU 0.8
             pred_row(2, [[20, 30, 0.9], [30, 40, 0.8], [0, 4, 0.7], [0, 6, 0.6]])]  # top-1 0; best of 5: 0.6
    brief = evaluate(preds, gt, protocol="charades")[0]["brief"]
    assert brief == {"R1@0.3": 50.0, "R1@0.5": 50.0, "R1@0.7": 50.0, "R5@0.3": 100.0, "R5@0.5": 100.0,
                     "R5@0.7": 50.0, "mIoU": 40.0}


def test_original_clip_level_metrics_by_hand():
    scores = [[0.1, 0.9, 0.8, 0.1], [0.9, 0.1, 0.1, 0.2]]
    labels = [[0, 1, 1, 0], [0, 0, 0, 1]]
    out = compute_comprehensive_metrics(scores, labels, gt_starts=[1, 3], gt_ends=[2, 3])
    assert out["r@1"] == 0.5 and out["r@5"] == 1.0
    assert out["mAP"] == pytest.approx((1.0 + 0.5) / 2)  # second: the positive is ranked 2nd
    # mean |diff|: (0.8 + 0.1 + 0.7) / 3 and (0.8 + 0 + 0.1) / 3
    assert out["temporal_consistency"] == pytest.approx(1 - (1.6 / 3 + 0.9 / 3) / 2)
    # spans around the best clip at >= half its score: [1, 2] (IoU 1) and [0, 0] (IoU 0)
    assert out["temporal_iou"] == pytest.approx(0.5)


@pytest.mark.parametrize("change, match", [
    (lambda p, g: p.append(dict(p[0])), "qid 1: appears twice in the predictions"),
    (lambda p, g: p.append(pred_row(99, [[0, 1, 1]])), "qid 99: in the predictions but not"),
    (lambda p, g: p[0].update(pred_relevant_windows=[[5, 2, 0.5]]), "qid 1: .* ends before it starts"),
    (lambda p, g: p[0].update(pred_relevant_windows=[[math.nan, 2, 0.5]]), "qid 1: .* not finite"),
    (lambda p, g: p[0].update(pred_relevant_windows=[[-1, 2, 0.5]]), "qid 1: .* negative"),
    (lambda p, g: p.pop(), "1 ground-truth qids have no prediction .first: 2."),
    (lambda p, g: g.append(dict(g[0])), "qid 1: appears twice in the ground truth"),
])
def test_bad_input_names_the_qid(change, match):
    gt = [gt_row(1, [[0, 10]]), gt_row(2, [[0, 10]])]
    preds = [pred_row(1, [[0, 10, 1.0]]), pred_row(2, [[0, 10, 1.0]])]
    change(preds, gt)
    with pytest.raises(BadInput, match=match):
        evaluate(preds, gt)


def test_allow_missing_scores_missing_as_empty():
    gt = [gt_row(1, [[0, 10]]), gt_row(2, [[0, 10]])]
    metrics, missing = evaluate([pred_row(1, [[0, 10, 1.0]])], gt, allow_missing=True)
    assert missing == 1 and metrics["brief"]["MR-full-R1@0.5"] == 50.0


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_vmr_eval_command(tmp_path, capsys):
    gt = _write_jsonl(tmp_path / "gt.jsonl", [gt_row(1, [[0, 10]]), gt_row(2, [[20, 30]])])
    preds = _write_jsonl(tmp_path / "p.jsonl", [pred_row(1, [[0, 10, 0.9]]), pred_row(2, [[0, 10, 0.9]])])
    assert main(["eval", "--predictions", preds, "--ground-truth", gt, "--json", str(tmp_path / "m.json")]) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["brief"]["MR-full-R1@0.5"] == 50.0
    assert "| Model |" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"qid": 1}\nnot json\n')
    assert main(["eval", "--predictions", str(tmp_path / "bad.jsonl"), "--ground-truth", gt]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.jsonl:2: not a JSON line (is this a JSONL file?)") and "\n" not in err


def test_vmr_eval_reads_charades_text_ground_truth(tmp_path, capsys):
    (tmp_path / "charades_test.txt").write_text("AB12C 0.0 10.0##a person opens a door.\n")
    preds = _write_jsonl(tmp_path / "p.jsonl", [pred_row("charades_test:1", [[0, 9, 0.9]])])
    assert main(["eval", "--predictions", preds, "--ground-truth", str(tmp_path / "charades_test.txt"),
                 "--protocol", "charades"]) == 0
    assert "R1@0.3" in capsys.readouterr().out


def test_leaderboard_lists_standard_and_original_columns():
    gt = [gt_row(1, [[0, 10]], duration=20, clips=[(c, [4, 4, 4]) for c in range(5)])]
    metrics = evaluate([pred_row(1, [[0, 10, 0.9]], [1.0] * 5 + [0.0] * 5)], gt)[0]
    table = leaderboard({"vmr-tiny": metrics})
    header = table.splitlines()[0]
    for column in ("R1@0.5", "R1@0.7", "MR-mAP", "HL-mAP", "HIT@1", "r@1", "r@5", "r@10", "temporal_consistency"):
        assert column in header
    assert table.splitlines()[2].startswith("| vmr-tiny | 100.00")


windows = st.tuples(st.floats(0, 100), st.floats(0.01, 50)).map(lambda w: (w[0], w[0] + w[1]))


@given(windows, windows)
def test_iou_properties(a, b):
    assert 0.0 <= iou(a, b) <= 1.0
    assert iou(a, b) == pytest.approx(iou(b, a))
    assert iou(a, a) == pytest.approx(1.0)


@given(st.lists(st.tuples(windows, st.floats(0, 1)), max_size=30), st.floats(0, 1), st.integers(1, 10))
def test_nms_properties(candidates, threshold, top_k):
    cands = [(w[0], w[1], s) for w, s in candidates]
    kept = nms(cands, threshold, top_k)
    assert len(kept) <= top_k and all(k in cands for k in kept)
    assert [k[2] for k in kept] == sorted((k[2] for k in kept), reverse=True)
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            assert iou(a[:2], b[:2]) <= threshold
    if cands:
        assert kept[0][2] == max(c[2] for c in cands)


def test_group_by_a_field_scores_each_group_on_its_own(tmp_path, capsys):
    """Hand-made: group a has 2 queries (1 hit), b has 1 (a hit), one query lacks the field; a list
    value counts in each of its groups; numbers bucket at the given edges."""
    gt = [gt_row(1, [[0, 10]]), gt_row(2, [[20, 30]]), gt_row(3, [[40, 50]]), gt_row(4, [[0, 5]], duration=200)]
    for row, tag in zip(gt, ["a", "a", ["b", "a"], None], strict=True):
        if tag is not None:
            row["kind"] = tag
    preds = [pred_row(1, [[0, 10, 0.9]]), pred_row(2, [[0, 10, 0.9]]), pred_row(3, [[40, 50, 0.9]]),
             pred_row(4, [[0, 5, 0.9]])]
    groups = evaluate_groups(preds, gt, "kind")["groups"]
    assert list(groups) == ["a", "(missing)", "b"]  # largest first
    assert groups["a"]["queries"] == 3 and groups["a"]["brief"]["MR-full-R1@0.5"] == pytest.approx(66.67)
    assert groups["b"]["queries"] == 1 and groups["b"]["brief"]["MR-full-R1@0.5"] == 100.0
    assert groups["(missing)"]["queries"] == 1
    buckets = evaluate_groups(preds, gt, "duration:100")["groups"]
    assert {k: v["queries"] for k, v in buckets.items()} == {"<100": 3, ">=100": 1}
    with pytest.raises(BadInput, match="no ground-truth query has a field 'colour'"):
        evaluate_groups(preds, gt, "colour")
    with pytest.raises(BadInput, match="not a number"):
        evaluate_groups(preds, gt, "kind:1,2")

    gt_file, pred_file = _write_jsonl(tmp_path / "gt.jsonl", gt), _write_jsonl(tmp_path / "p.jsonl", preds)
    assert main(["eval", "--predictions", pred_file, "--ground-truth", gt_file, "--group-by", "kind",
                 "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "| kind |" in out and "| a (3 queries) |" in out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["groups"]["field"] == "kind" and saved["groups"]["groups"]["b"]["queries"] == 1
    assert main(["eval", "--predictions", pred_file, "--ground-truth", gt_file, "--group-by", "nope"]) == 2
    assert "no ground-truth query has a field 'nope'" in capsys.readouterr().err
