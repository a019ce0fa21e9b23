import json

import pytest

from vmr.data.annotations import QueryRecord, check_query, detect_format, read_annotations
from vmr.errors import UserError


def test_seed_rows_of_one_event_merge_into_one_query(tmp_path):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps([
        {"id": 1, "video_id": "abc_60.0_210.0.mp4", "query": "a red circle blinks", "start_frame": 10,
         "end_frame": 19, "description": ""},
        {"id": 2, "video_id": "abc_60.0_210.0.mp4", "query": "a red circle blinks", "start_frame": 40,
         "end_frame": 49, "description": ""},
        {"id": 3, "video_id": "abc_60.0_210.0.mp4", "query": "a blue square grows", "start_frame": 0,
         "end_frame": 5, "description": ""},
    ]))
    assert detect_format(path) == "seed"
    records, skips = read_annotations(path)
    assert not skips
    assert [(r.qid, r.video_id, r.moments, r.unit) for r in records] == [
        (1, "abc_60.0_210.0", [(10, 19), (40, 49)], "frames"),
        (3, "abc_60.0_210.0", [(0, 5)], "frames"),
    ]
    assert records[0].video_file == "abc_60.0_210.0.mp4"


def test_qvhighlights_lines_keep_ids_with_dots_and_saliency(tmp_path):
    path = tmp_path / "val.jsonl"
    rows = [
        {"qid": 7, "query": "man talks", "vid": "j7rJstUseKg_360.0_510.0", "duration": 150,
         "relevant_windows": [[0, 4], [10, 14]], "relevant_clip_ids": [0, 1, 5, 6],
         "saliency_scores": [[1, 2, 3], [4, 4, 4], [2, 2, 2], [0, 1, 1]]},
        {"qid": 8, "query": "dog runs", "vid": "x_1.0_2.0", "duration": 150, "relevant_windows": [[2, 6]]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert detect_format(path) == "qvhighlights"
    records, skips = read_annotations(path)
    assert not skips
    assert records[0].video_id == "j7rJstUseKg_360.0_510.0"
    assert records[0].moments == [(0.0, 4.0), (10.0, 14.0)]
    assert records[0].saliency == {"clip_seconds": 2.0, "clip_ids": [0, 1, 5, 6],
                                   "scores": rows[0]["saliency_scores"]}
    assert records[1].saliency is None


def test_charades_lines(tmp_path):
    path = tmp_path / "charades_sta_test.txt"
    path.write_text("3MSZA 24.3 30.4##person turn a light on.\nbroken line\n3MSZA 0 5.5##person opens a door\n")
    assert detect_format(path) == "charades"
    records, skips = read_annotations(path)
    assert [(r.qid, r.video_id, r.query, r.moments) for r in records] == [
        ("charades_sta_test:1", "3MSZA", "person turn a light on.", [(24.3, 30.4)]),
        ("charades_sta_test:3", "3MSZA", "person opens a door", [(0.0, 5.5)]),
    ]
    assert len(skips) == 1 and "charades_sta_test.txt:2" in skips[0].reason


def test_malformed_line_is_skipped_with_its_location(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"qid": 1, "query": "q", "vid": "v", "relevant_windows": [[0, 1]]}\n'
                    '{"qid": 2, "query": "q"}\n')
    records, skips = read_annotations(path)
    assert len(records) == 1
    assert "a.jsonl:2" in skips[0].reason and skips[0].qid == 2


@pytest.mark.parametrize("content", ["hello world\n", "", "<xml/>"])
def test_unknown_format_is_a_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(UserError, match="notes.txt"):
        read_annotations(path)


def test_missing_file_and_bad_format_name(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_annotations(tmp_path / "nope.json")
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(UserError, match="unknown annotation format"):
        read_annotations(tmp_path / "a.json", "youcook")


@pytest.mark.parametrize(("windows", "unit", "query", "problem"), [
    ([(5.0, 5.0)], "seconds", "q", "end <= start"),
    ([(6.0, 5.0)], "seconds", "q", "end <= start"),
    ([(-1.0, 5.0)], "seconds", "q", "before 0"),
    ([(float("nan"), 5.0)], "seconds", "q", "not finite"),
    ([(1.0, 2.0)], "seconds", "   ", "empty query"),
    ([(7, 6)], "frames", "q", "end <= start"),
    ([(7, 7)], "frames", "q", None),  # one frame: end is inclusive
])
def test_check_query(windows, unit, query, problem):
    reason = check_query(QueryRecord(1, "v", query, windows, unit=unit, source="f:1"))
    assert (reason is None) if problem is None else (problem in reason and reason.startswith("f:1"))
