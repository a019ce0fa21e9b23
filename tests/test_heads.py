"""The published heads against their reference implementations: forward, Hungarian matching, every
loss term, one optimizer step and the inference post-processing, on the numbers the reference code
produced (tests/fixtures/heads/, made by make_fixtures.py there). Float32, CPU, eval mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vmr.config import DetrConfig
from vmr.model.heads import HEADS
from vmr.model.heads.detr import DetrTargets, detr_losses, loss_weights, ranked_windows

from .heads_rule import fill

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
    for name, value, weight in zip(fixture["loss_names"], fixture["loss_values"], fixture["loss_weights"], strict=True):
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


# ----- released checkpoints ----------------------------------------------------------------------

def reference_checkpoint(head: str, path: Path, **changes) -> Path:
    """A checkpoint file as the references save it: the model's state dict (the fixture's weights)
    and the run's ``opt`` namespace (with a ``torch.device``), beside optimizer state and the epoch."""
    import argparse

    fixture = load(head)
    state = build(head, fixture).state_dict()
    opt = argparse.Namespace(
        device=torch.device("cpu"), ctx_mode="video_tef", v_feat_dim=fixture["src_vid"].shape[-1],
        t_feat_dim=fixture["src_txt"].shape[-1], span_loss_type="l1", contrastive_align_loss=False, a_feat_dir=None,
        hidden_dim=256, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=1024, dropout=0.1, input_dropout=0.5,
        n_input_proj=2, num_queries=10, use_txt_pos=False, max_q_l=32, max_v_l=75, aux_loss=True, set_cost_span=10,
        set_cost_giou=1, set_cost_class=4, span_loss_coef=10, giou_loss_coef=1, label_loss_coef=4, eos_coef=0.1,
        lw_saliency=1.0, saliency_margin=0.2, clip_length=2, nms_thd=-1, lr=1e-4, wd=1e-4, grad_clip=0.1,
        no_norm_vfeat=False, no_norm_tfeat=False, v_feat_dirs=["features/clip_features"], results_dir="results/x")
    for key, value in changes.items():
        setattr(opt, key, value)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 3, "opt": opt}, path)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The fixtures' release-layout data brought in by vmr features import, in float32."""
    from vmr.cli import main

    out = tmp_path_factory.mktemp("imported")
    released = FIXTURES / "released"
    assert main(["features", "import", "--video-features", str(released / "video"), "--text-features",
                 str(released / "text"), "--annotations", str(released / "annotations.jsonl"), "--out", str(out),
                 "--split", "val", "--dtype", "float32"]) == 0
    return out


@pytest.mark.parametrize("head", PUBLISHED)
def test_a_converted_checkpoint_predicts_as_the_reference_on_imported_features(head, imported, tmp_path):
    from vmr.cli import main
    from vmr.config import load_config

    bundle = tmp_path / "bundle"
    assert main(["convert", "--checkpoint", str(reference_checkpoint(head, tmp_path / "model_best.ckpt")),
                 "--out", str(bundle)]) == 0
    cfg = load_config(bundle / "config.yaml")
    assert cfg.model.head == head and cfg.model.feature_dim == 16 and cfg.model.text_feature_dim == 12
    assert cfg.model.detr.tef and cfg.data.sampling.fps == 0.5 and cfg.data.sampling.window == 75
    # QD-DETR's text-to-video mask depends on which queries share a batch (the reference's layout, kept):
    # its predictions equal the reference's for the same batches, here every query in file order, as its
    # evaluation (batches of 100) reads them. One loader worker keeps that order.
    from vmr.config import save_config

    cfg.data.num_workers = 0
    save_config(cfg, bundle / "config.yaml")
    predictions = tmp_path / "predictions.jsonl"
    assert main(["eval", "--checkpoint", str(bundle), "--shards", str(imported / "val-*.tar"), "--batch-size", "100",
                 "--predictions-out", str(predictions), "--json", str(tmp_path / "metrics.json")]) == 0
    ours = {row["qid"]: row for row in map(json.loads, predictions.read_text().splitlines())}
    theirs = [json.loads(line) for line in (FIXTURES / f"{head}_predictions.jsonl").read_text().splitlines()]
    assert len(ours) == len(theirs)
    for row in theirs:
        mine = ours[row["qid"]]
        assert mine["pred_relevant_windows"] == row["pred_relevant_windows"]
        # The file rounds saliency to 4 decimals; the reference writes its float16 values unrounded.
        assert mine["pred_saliency_scores"] == pytest.approx(row["pred_saliency_scores"], abs=1e-4)


HOSTILE = {
    "a pickle that would run code": "code",
    "missing weights": "missing",
    "misshapen weights": "shape",
    "another head's weights": "other",
    "not a checkpoint": "garbage",
    "no opt": "no_opt",
    "an unsupported variant": "ce",
}


@pytest.mark.parametrize("case", sorted(HOSTILE.values()))
def test_a_hostile_checkpoint_is_one_line_and_nothing_runs(case, tmp_path, capsys):
    import os
    import pickle

    from vmr.cli import main

    path = tmp_path / "model.ckpt"
    marker = tmp_path / "ran"
    if case == "code":
        class Payload:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)
        with open(path, "wb") as f:
            pickle.dump({"model": {}, "opt": Payload()}, f)
        torch.save({"model": {}, "opt": Payload()}, tmp_path / "model2.ckpt")
    elif case == "garbage":
        path.write_bytes(b"\x80\x04not a checkpoint at all")
    else:
        reference_checkpoint("qd_detr" if case == "other" else "moment_detr", path,
                             **({"span_loss_type": "ce"} if case == "ce" else {}))
        content = torch.load(path, weights_only=False)
        if case == "missing":
            content["model"].pop("class_embed.weight")
        elif case == "shape":
            content["model"]["class_embed.weight"] = torch.zeros(3, 256)
        elif case == "no_opt":
            content.pop("opt")
        elif case == "other":  # QD-DETR weights, Moment-DETR-like opt: still QD-DETR; drop its token
            content["model"].pop("global_rep_token")
        torch.save(content, path)
    for candidate in [path] + ([tmp_path / "model2.ckpt"] if case == "code" else []):
        assert main(["convert", "--checkpoint", str(candidate), "--out", str(tmp_path / "bundle")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vmr convert: error: ") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "bundle").exists()
