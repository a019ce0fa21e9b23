import math

from hypothesis import given
from hypothesis import strategies as st

from vmr.spans import clip_relevance, frames_to_seconds, iou, merge_spans, seconds_to_frames


def test_frames_to_seconds_end_is_inclusive():
    # Frames 10..19 at 5 fps are shown from 2.0 s until 4.0 s.
    assert frames_to_seconds(10, 19, 5.0) == (2.0, 4.0)
    assert frames_to_seconds(0, 0, 10.0) == (0.0, 0.1)


@given(st.integers(0, 10_000), st.integers(0, 500), st.sampled_from([1.0, 2.0, 5.0, 10.0, 24.0, 25.0, 29.97, 30.0]))
def test_frames_seconds_round_trip(first, length, fps):
    start, end = frames_to_seconds(first, first + length, fps)
    assert seconds_to_frames(start, end, fps) == (first, first + length)


def test_iou_hand_cases():
    assert iou((0, 10), (0, 10)) == 1.0
    assert iou((0, 10), (5, 15)) == 5 / 15
    assert iou((0, 1), (2, 3)) == 0.0


@given(st.floats(0, 100), st.floats(0.01, 50), st.floats(0, 100), st.floats(0.01, 50))
def test_iou_is_symmetric_and_bounded(s1, l1, s2, l2):
    a, b = (s1, s1 + l1), (s2, s2 + l2)
    assert math.isclose(iou(a, b), iou(b, a))
    assert 0.0 <= iou(a, b) <= 1.0 + 1e-12


def test_merge_and_clip_relevance():
    assert merge_spans([(5, 8), (0, 3), (2, 4)]) == [(0, 4), (5, 8)]
    # 2-second clips of a 7-second video: [0,2) [2,4) [4,6) [6,7)
    assert clip_relevance([(1.0, 4.0), (6.5, 7.0)], 7.0) == [0.5, 1.0, 0.0, 0.5]
