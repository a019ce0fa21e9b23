"""The published heads against their reference implementations: forward, Hungarian matching, every
loss term, one optimizer step and the inference post-processing, on the numbers the reference code
produced (tests/fixtures/heads/, made by make_fixtures.py there). Float32, CPU, eval mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from heads_rule import fill
from vmr.config import DetrConfig
from vmr.model.heads import HEADS
from vmr.model.heads.detr import DetrTargets, detr_losses, loss_weights, ranked_windows

FIXTURES = Path(__file__).parent / "fixtures" / "heads"
RTOL, ATOL = 1e-5, 1e-6
PUBLISHED = ("moment_detr", "qd_detr")


def load(head: str) -> dict:
    with np.load(FIXTURES / f"{head}.npz") as data:
        return {k: data[k] for k in data.files}


def build(head: str, fixture: dict) -> torch.nn.Module:
    cfg = DetrConfig()
    model = HEADS[head](cfg, video_width=fixture["src_vid"].shape[-1] - 2, text_width=fixture["src_txt"].shape[-1])
    fill(model)
    return model.eval()


def inputs(fixture: dict) -> dict:
    return {k: torch.from_numpy(fixture[k]) for k in ("src_txt", "src_txt_mask", "src_vid", "src_vid_mask")}


def targets(fixture: dict) -> DetrTargets:
    spans = list(torch.from_numpy(fixture["span_cxw"]).split(fixture["span_count"].tolist()))
    q = len(spans)
    return DetrTargets(spans=spans, saliency_pos=torch.from_numpy(fixture["saliency_pos"]),
                       saliency_neg=torch.from_numpy(fixture["saliency_neg"]),
                       saliency_all=torch.from_numpy(fixture["saliency_all"]), saliency_valid=torch.ones(q, dtype=torch.bool))


def close(ours: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(ours.detach().numpy(), theirs, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("head", PUBLISHED)
def test_the_parameters_are_the_references(head):
    fixture = load(head)
    names = sorted(n for n, _ in build(head, fixture).named_parameters())
    assert names == sorted(fixture["param_names"].tolist())


@pytest.mark.parametrize("head", PUBLISHED)
def test_forward_equals_the_reference(head):
    fixture = load(head)
    with torch.no_grad():
        out = build(head, fixture).reference_forward(**inputs(fixture))
    keys = ["pred_logits", "pred_spans", "saliency_scores"] + (["saliency_scores_neg"] if head == "qd_detr" else [])
    for key in keys:
        close(out[key], fixture[f"out_{key}"], key)
    close(out["aux_pred_logits"], fixture["out_aux_pred_logits"], "aux_pred_logits")
    close(out["aux_pred_spans"], fixture["out_aux_pred_spans"], "aux_pred_spans")


@pytest.mark.parametrize("head", PUBLISHED)
def test_matching_and_losses_equal_the_reference(head):
    fixture = load(head)
    model = build(head, fixture)
    out = model.reference_forward(**inputs(fixture))
    losses = detr_losses(out, targets(fixture), model.cfg, model.saliency_loss)
    for layer, matched in enumerate(losses["matched"]):
        assert torch.cat([s for s, _ in matched]).tolist() == fixture[f"match{layer}_src"].tolist()
        assert torch.cat([t for _, t in matched]).tolist() == fixture[f"match{layer}_tgt"].tolist()
    weights = loss_weights(model.cfg)
    for name, value, weight in zip(fixture["loss_names"], fixture["loss_values"], fixture["loss_weights"]):
        np.testing.assert_allclose(float(losses[name].detach()), value, rtol=RTOL, err_msg=name)
        assert weights[name] == weight
    assert sorted(weights) == sorted(fixture["loss_names"].tolist())
    np.testing.assert_allclose(float(losses["loss"]), float(fixture["loss_total"]), rtol=RTOL)


@pytest.mark.parametrize("head", PUBLISHED)
def test_one_optimizer_step_equals_the_reference(head):
    fixture = load(head)
    model = build(head, fixture)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    loss = detr_losses(model.reference_forward(**inputs(fixture)), targets(fixture), model.cfg, model.saliency_loss)["loss"]
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    np.testing.assert_allclose(float(norm), float(fixture["grad_norm"]), rtol=RTOL)
    optimizer.step()
    params = dict(model.named_parameters())
    deltas = np.stack([(params[n].detach() - before[n]).double().norm().numpy() for n in fixture["param_names"]])
    # Key biases have a true gradient of 0 (softmax ignores a shift shared by all keys): their float
    # rounding noise, normalised by Adam, moves them by up to ~1e-7 in either implementation. 1e-6
    # is 1% of one step at lr 1e-4; every other parameter moves by 1e-4 or more.
    np.testing.assert_allclose(deltas, fixture["param_delta"], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        after = model.reference_forward(**inputs(fixture))
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        close(after[key], fixture[f"after_{key}"], f"{key} after one step")


@pytest.mark.parametrize("head", PUBLISHED)
def test_post_processing_equals_the_reference(head):
    fixture = load(head)
    with torch.no_grad():
        out = build(head, fixture).reference_forward(**inputs(fixture))
    expected = [json.loads(line) for line in (FIXTURES / f"{head}_predictions.jsonl").read_text().splitlines()]
    for i, row in enumerate(expected):
        duration = float(fixture["src_vid_mask"][i].sum() * 2)  # 2-s clips
        assert ranked_windows(out["pred_logits"][i], out["pred_spans"][i], duration, 2.0) == row["pred_relevant_windows"]
        n = int(fixture["src_vid_mask"][i].sum())
        assert out["saliency_scores"][i, :n].half().tolist() == row["pred_saliency_scores"]
