"""Reports over the protocols of vmr/eval/metrics.py: the metrics on each group of queries that
share the value of an annotation field (``vmr eval --group-by FIELD``, numbers optionally bucketed:
``FIELD:10,30``), and the markdown leaderboard ``vmr eval`` prints."""

from __future__ import annotations

import json
from collections import OrderedDict

from vmr.eval.metrics import BadInput, evaluate


def parse_group_by(spec: str) -> tuple[str, list[float] | None]:
    """``FIELD`` or ``FIELD:E1,E2,...`` (ascending bucket edges for a numeric field)."""
    name, _, edges = spec.partition(":")
    if not name:
        raise BadInput(f"--group-by {spec!r}: give a field name, e.g. --group-by told_apart_by")
    if not edges:
        return name, None
    try:
        values = [float(e) for e in edges.split(",")]
    except ValueError:
        raise BadInput(f"--group-by {spec!r}: bucket edges must be numbers, e.g. {name}:10,30") from None
    if values != sorted(set(values)):
        raise BadInput(f"--group-by {spec!r}: bucket edges must be strictly increasing")
    return name, values


def _group_labels(value, edges: list[float] | None, field: str, qid) -> list[str]:
    """The group(s) of one query: a list value puts the query in each of its elements' groups."""
    if value is None:
        return ["(missing)"]
    if isinstance(value, list):
        return sorted({label for v in value for label in _group_labels(v, edges, field, qid)}) or ["(empty)"]
    if edges is None:
        return [json.dumps(value) if isinstance(value, dict) else str(value).lower() if isinstance(value, bool)
                else str(value)]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"qid {qid}: {field} is {value!r}, not a number to bucket")
    above = [e for e in edges if e <= value]
    below = [e for e in edges if e > value]
    if not above:
        return [f"<{below[0]:g}"]
    if not below:
        return [f">={above[-1]:g}"]
    return [f"{above[-1]:g}-{below[0]:g}"]


def evaluate_groups(predictions: list[dict], ground_truth: list[dict], group_by: str,
                    protocol: str = "qvhighlights", allow_missing: bool = False) -> OrderedDict:
    """``{"field", "groups": {value: {"queries": n, **metrics}}}``: the protocol's metrics on each
    subset of the ground truth that shares the value of ``group_by`` (see ``parse_group_by``),
    largest group first. A query without the field falls in ``(missing)``."""
    name, edges = parse_group_by(group_by)
    if not any(name in row for row in ground_truth):
        known = sorted({k for row in ground_truth for k in row} - {"relevant_windows", "saliency_scores",
                                                                     "relevant_clip_ids", "label"})
        raise BadInput(f"--group-by: no ground-truth query has a field {name!r} (fields: {', '.join(known)})")
    members: dict[str, list[dict]] = {}
    for row in ground_truth:
        for label in _group_labels(row.get(name), edges, name, row.get("qid")):
            members.setdefault(label, []).append(row)
    by_qid = {row.get("qid"): row for row in predictions}
    out = OrderedDict(field=group_by, groups=OrderedDict())
    for label, rows in sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        subset = [by_qid[r["qid"]] for r in rows if r["qid"] in by_qid]
        metrics, _ = evaluate(subset, rows, protocol, allow_missing)
        out["groups"][label] = OrderedDict(queries=len(rows), **metrics)
    return out


# (column, where to find it): the first (section, key) a result has. Protocols name alike things
# alike in the table: the grounding protocols' R1@0.5 shares QVHighlights' column.
LEADERBOARD_COLUMNS = [
    ("R1@0.1", [("brief", "R1@0.1")]),
    ("R1@0.3", [("brief", "R1@0.3")]),
    ("R1@0.5", [("brief", "MR-full-R1@0.5"), ("brief", "R1@0.5")]),
    ("R1@0.7", [("brief", "MR-full-R1@0.7"), ("brief", "R1@0.7")]),
    ("R5@0.5", [("brief", "R5@0.5")]), ("R5@0.7", [("brief", "R5@0.7")]), ("mIoU", [("brief", "mIoU")]),
    ("mAP@0.5", [("brief", "MR-full-mAP@0.5")]), ("MR-mAP", [("brief", "MR-full-mAP")]),
    ("HL-mAP", [("brief", "HL-min-VeryGood-mAP"), ("brief", "HL-mAP")]),
    ("HIT@1", [("brief", "HL-min-VeryGood-Hit1")]),
    ("r@1", [("clip_level", "r@1")]), ("r@5", [("clip_level", "r@5")]), ("r@10", [("clip_level", "r@10")]),
    ("mAP", [("clip_level", "mAP")]), ("temporal_consistency", [("clip_level", "temporal_consistency")]),
]


def _cell(metrics: dict, paths: list[tuple[str, str]]):
    return next((metrics[section][key] for section, key in paths if key in metrics.get(section, {})), None)


def leaderboard(results: dict[str, dict], first_column: str = "Model") -> str:
    """A markdown table, one row per model (or group); columns no row has are left out."""
    columns = [(name, paths) for name, paths in LEADERBOARD_COLUMNS
               if any(_cell(m, paths) is not None for m in results.values())]
    lines = [f"| {first_column} | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for model, metrics in results.items():
        cells = [_cell(metrics, paths) for _, paths in columns]
        lines.append(f"| {model} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)
