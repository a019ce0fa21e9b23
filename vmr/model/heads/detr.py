"""What the published DETR heads share (Moment-DETR, QD-DETR): input projections, sine positions,
the set criterion (Hungarian matching, label, span, gIoU and saliency-hinge losses, auxiliary decoder
layers), and the references' inference post-processing.

Every formula here equals the reference implementations (jayleicn/moment_detr b7e553a,
wjun0830/QD-DETR 56c63b2) in float32; parameter names are theirs, so a released checkpoint's
``model`` state dict loads as it is (vmr/convert.py). Tested against fixtures the
reference code produced (tests/test_heads.py).

Legend: q queries, t frames (the reference's clips), l text tokens, n moment slots (num_queries),
m ground-truth moments of a query, d width, k decoder layers. Spans inside the head are (centre,
width) shares of the window; the post-processing turns them into seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vmr.config import DetrConfig

FOREGROUND, BACKGROUND = 0, 1  # the references' class indices
# The loader batch's per-query targets (vmr/data/collate.py) that batch_targets reads.
QUERY_KEYS = ("moments", "moment_mask", "has_moments", "relevance", "saliency", "has_saliency", "query_mask")


class LinearLayer(nn.Module):
    """LayerNorm -> dropout -> linear (-> ReLU): one step of the input projections."""

    def __init__(self, width_in: int, width_out: int, dropout: float, relu: bool):
        super().__init__()
        self.relu = relu
        self.LayerNorm = nn.LayerNorm(width_in)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(width_in, width_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net(self.LayerNorm(x))
        return F.relu(x) if self.relu else x


def input_projection(width_in: int, width: int, layers: int, dropout: float) -> nn.Sequential:
    """``layers`` LinearLayers; ReLU after each but the last."""
    return nn.Sequential(*(LinearLayer(width_in if i == 0 else width, width, dropout, relu=i < layers - 1)
                           for i in range(layers)))


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, width_in: int, width: int, width_out: int, layers: int):
        super().__init__()
        sizes = [width_in] + [width] * (layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:] + [width_out], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class TextPositions(nn.Module):
    """Learned text positions (built by both references, applied only with ``use_txt_pos``)."""

    def __init__(self, positions: int, width: int, dropout: float):
        super().__init__()
        self.position_embeddings = nn.Embedding(positions, width)
        self.LayerNorm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.position_embeddings(torch.arange(x.shape[1], device=x.device))
        return self.dropout(self.LayerNorm(x + positions))


def sine_features(values: torch.Tensor, width: int) -> torch.Tensor:
    """(...) angles -> (..., width) sines and cosines at DETR's frequencies, interleaved
    (sin at even, cos at odd positions)."""
    index = torch.arange(width, dtype=torch.float32, device=values.device)
    angles = values[..., None] / 10000 ** (2 * (index // 2) / width)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def frame_positions(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(q, t) float mask -> (q, t, width) sine positions of the valid frames, normalised to the
    video's length (the references' PositionEmbeddingSine(width, normalize=True))."""
    position = mask.cumsum(1, dtype=torch.float32)
    return sine_features(position / (position[:, -1:] + 1e-6) * 2 * math.pi, width)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation as the references' data loaders do it (norm + 1e-5)."""
    return x / (x.norm(dim=-1, keepdim=True) + 1e-5)


def time_endpoints(mask: torch.Tensor) -> torch.Tensor:
    """(q, t) mask -> (q, t, 2) each valid frame's [start, end) as shares of the valid length
    (ctx_mode video_tef), zeros on padding."""
    length = mask.sum(dim=1, keepdim=True).clamp(min=1)
    start = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32) / length
    return torch.stack([start, start + 1.0 / length], dim=-1) * rearrange(mask, "q t -> q t 1")


# ----- spans -------------------------------------------------------------------------------------

def cxw_to_xx(spans: torch.Tensor) -> torch.Tensor:
    return torch.stack([spans[..., 0] - 0.5 * spans[..., 1], spans[..., 0] + 0.5 * spans[..., 1]], dim=-1)


def xx_to_cxw(spans: torch.Tensor) -> torch.Tensor:
    return torch.stack([(spans[..., 0] + spans[..., 1]) * 0.5, spans[..., 1] - spans[..., 0]], dim=-1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, 2) x (m, 2) [start, end] -> (n, m) generalised IoU."""
    a, b = a.float(), b.float()
    inter = (torch.min(a[:, None, 1], b[:, 1]) - torch.max(a[:, None, 0], b[:, 0])).clamp(min=0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0]) - inter
    hull = (torch.max(a[:, None, 1], b[:, 1]) - torch.min(a[:, None, 0], b[:, 0])).clamp(min=0)
    return inter / union - (hull - union) / hull


# ----- the set criterion -------------------------------------------------------------------------

@dataclass
class DetrTargets:
    """What the criterion compares with, in the references' terms: per query its moments as
    (centre, width) shares of the window (``spans``, a list of (m, 2)); two positive and two negative
    frames for the saliency hinge (``saliency_pos``/``saliency_neg`` (q, 2)); every frame's summed
    annotator score, 0-12 (``saliency_all`` (q, t), QD-DETR's rank-contrastive loss); and which
    queries the saliency terms count (``saliency_valid`` (q,), all True in the references)."""

    spans: list[torch.Tensor]
    saliency_pos: torch.Tensor
    saliency_neg: torch.Tensor
    saliency_all: torch.Tensor
    saliency_valid: torch.Tensor


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, spans: torch.Tensor, targets: list[torch.Tensor],
                    cfg: DetrConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per query, (slot indices, target indices) of the cheapest one-to-one assignment: cost =
    set_cost_span x L1 + set_cost_giou x -gIoU + set_cost_class x -p(foreground)."""
    from scipy.optimize import linear_sum_assignment

    q, n = logits.shape[:2]
    probability = rearrange(logits, "q n c -> (q n) c").softmax(-1)[:, FOREGROUND]
    flat = rearrange(spans, "q n two -> (q n) two")
    everything = torch.cat(targets) if targets else flat.new_zeros(0, 2)
    cost = (cfg.set_cost_span * torch.cdist(flat, everything, p=1)
            - cfg.set_cost_giou * generalized_iou(cxw_to_xx(flat), cxw_to_xx(everything))
            - cfg.set_cost_class * probability[:, None])
    cost = rearrange(cost, "(q n) m -> q n m", q=q).cpu()
    matched = []
    for i, block in enumerate(cost.split([len(t) for t in targets], -1)):
        rows, cols = linear_sum_assignment(block[i])
        matched.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return matched


def set_losses(logits: torch.Tensor, spans: torch.Tensor, targets: DetrTargets, cfg: DetrConfig,
               weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], list]:
    """One decoder layer's label (weighted cross-entropy, background down-weighted by ``eos_coef``),
    span (L1 on centre/width) and gIoU losses after matching. A batch without any moment gives 0."""
    matched = hungarian_match(logits, spans, targets.spans, cfg)
    rows = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matched)])
    slots = torch.cat([src for src, _ in matched])
    classes = torch.full(logits.shape[:2], BACKGROUND, dtype=torch.int64, device=logits.device)
    classes[rows, slots] = FOREGROUND
    loss_label = F.cross_entropy(rearrange(logits, "q n c -> q c n"), classes, weight, reduction="none").mean()
    predicted = spans[rows, slots]
    wanted = torch.cat([t[j] for t, (_, j) in zip(targets.spans, matched, strict=True)]).to(predicted)
    if len(wanted):
        loss_span = F.l1_loss(predicted, wanted, reduction="none").mean()
        loss_giou = (1 - torch.diag(generalized_iou(cxw_to_xx(predicted), cxw_to_xx(wanted)))).mean()
    else:  # no moment in the batch (negatives, highlight-only data): nothing to regress
        loss_span = loss_giou = spans.sum() * 0
    return {"loss_label": loss_label, "loss_span": loss_span, "loss_giou": loss_giou}, matched


def saliency_hinge(scores: torch.Tensor, targets: DetrTargets, margin: float) -> torch.Tensor:
    """Positive frames must score ``margin`` above negative ones (the references' loss_saliency,
    over the queries ``saliency_valid`` names)."""
    rows = torch.arange(len(scores), device=scores.device)[:, None]
    pos, neg = scores[rows, targets.saliency_pos], scores[rows, targets.saliency_neg]
    valid = rearrange(targets.saliency_valid.to(scores), "q -> q 1")
    pairs = targets.saliency_pos.shape[1]
    return (torch.clamp(margin + neg - pos, min=0) * valid).sum() / (valid.sum() * pairs).clamp(min=1) * 2


def detr_losses(outputs: dict, targets: DetrTargets, cfg: DetrConfig, saliency_loss) -> dict[str, torch.Tensor]:
    """Every weighted term of the references' SetCriterion, their sum as ``loss``, and the matching
    of each layer (``matched``: the last layer first, then the auxiliary ones in order)."""
    weight = torch.ones(2, device=outputs["pred_logits"].device)
    weight[-1] = cfg.eos_coef
    terms, matched = set_losses(outputs["pred_logits"].float(), outputs["pred_spans"].float(), targets, cfg, weight)
    terms["loss_saliency"] = saliency_loss(outputs, targets)
    layers = [matched]
    if cfg.aux_loss:
        for i, (logits, spans) in enumerate(zip(outputs["aux_pred_logits"], outputs["aux_pred_spans"], strict=True)):
            aux, matched = set_losses(logits.float(), spans.float(), targets, cfg, weight)
            terms.update({f"{k}_{i}": v for k, v in aux.items()})
            layers.append(matched)
    weights = loss_weights(cfg)
    total = sum(weights[k] * v for k, v in terms.items())
    return {"loss": total, **terms, "matched": layers}


def loss_weights(cfg: DetrConfig) -> dict[str, float]:
    """The references' weight_dict: each term's weight, auxiliary layers' terms included."""
    weights = {"loss_span": cfg.span_loss_coef, "loss_giou": cfg.giou_loss_coef, "loss_label": cfg.label_loss_coef,
               "loss_saliency": cfg.lw_saliency}
    if cfg.aux_loss:
        for i in range(cfg.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in list(weights.items())[:3]})
    return weights


# ----- targets from a vmr batch ------------------------------------------------------------------

def batch_targets(batch: dict, duration: torch.Tensor, frame_mask: torch.Tensor,
                  generator: torch.Generator | None = None) -> DetrTargets:
    """The references' targets from the loader's batch (vmr/data/collate.py). Moments become shares
    of the window; saliency scores are the frames' annotator scores summed over three raters
    (``saliency`` x 12; frames of queries without annotator scores: relevance, 0 or 1). Saliency
    pairs as the references sample them: the best- and worst-scored frames inside the moments, one
    random frame inside and one outside (the hard pair again when every frame is inside). Queries
    without any positive frame in the window count in no saliency term."""
    moments, present = batch["moments"].float(), batch["moment_mask"].bool()
    if "has_moments" in batch:
        present = present & rearrange(batch["has_moments"].bool(), "q -> q 1")
    spans = [xx_to_cxw(moments[i][present[i]] / duration[i].float()).clamp(0, 1) for i in range(len(moments))]
    has = rearrange(batch["has_saliency"].bool(), "q -> q 1")
    relevance = batch["relevance"].float()
    scores = torch.where(has, batch["saliency"].float() * 12, relevance) * frame_mask
    inside = (relevance > 0) & frame_mask.bool()
    best = torch.where(inside, scores, -math.inf).argmax(dim=1)
    worst = torch.where(inside, scores, math.inf).argmin(dim=1)
    noise = torch.rand(scores.shape, generator=generator, device=scores.device)
    easy_pos = torch.where(inside, noise, -1.0).argmax(dim=1)
    outside = ~inside & frame_mask.bool()
    easy_neg = torch.where(outside, noise, -1.0).argmax(dim=1)
    any_outside = outside.any(dim=1)
    easy_pos, easy_neg = torch.where(any_outside, easy_pos, best), torch.where(any_outside, easy_neg, worst)
    valid = inside.any(dim=1)
    if "query_mask" in batch:
        valid &= batch["query_mask"].bool()
    return DetrTargets(spans=spans, saliency_pos=torch.stack([best, easy_pos], dim=1),
                       saliency_neg=torch.stack([worst, easy_neg], dim=1), saliency_all=scores, saliency_valid=valid)


# ----- inference post-processing -----------------------------------------------------------------

def ranked_windows(logits: torch.Tensor, spans: torch.Tensor, duration: float, clip_length: float) -> list[list[float]]:
    """One query's slots -> ``[[start, end, score], ...]`` in seconds, best first: the foreground
    probability as the score, spans times the duration, rounded to 4 decimals, clipped to [0,
    duration] and rounded to multiples of ``clip_length`` (the references' compute_mr_results and
    PostProcessorDETR; their clip to [0, 150] is QVHighlights' duration)."""
    scores = logits.float().softmax(-1)[:, FOREGROUND]
    seconds = cxw_to_xx(spans.float()) * duration
    rows = sorted(torch.cat([seconds, scores[:, None]], dim=1).tolist(), key=lambda r: r[2], reverse=True)
    rows = torch.tensor([[float(f"{v:.4f}") for v in row] for row in rows])
    windows = torch.clamp(rows[:, :2], min=0, max=duration)
    if clip_length > 0:
        windows = torch.round(windows / clip_length) * clip_length
    return [[float(s), float(e), float(f"{p:.4f}")] for (s, e), p in zip(windows.tolist(), rows[:, 2].tolist(), strict=True)]


def decoder_layers_output(outputs_class: torch.Tensor, outputs_coord: torch.Tensor, aux: bool) -> dict:
    """(k, q, n, 2) class logits and spans of every decoder layer -> the last layer's and the others'."""
    out = {"pred_logits": outputs_class[-1], "pred_spans": outputs_coord[-1]}
    if aux:
        out["aux_pred_logits"], out["aux_pred_spans"] = outputs_class[:-1], outputs_coord[:-1]
    return out


def other_video_queries(video_index: torch.Tensor) -> torch.Tensor:
    """For each query, the next query (cyclically) of another video: QD-DETR's negative sentence.
    With one query per video this is the reference's shift by one; with several, a query of the same
    video is never its negative (its moments may be anywhere in the video). A batch of one video
    falls back to the shift by one."""
    q = len(video_index)
    order = (torch.arange(q, device=video_index.device)[:, None] + torch.arange(1, q + 1, device=video_index.device)) % q
    other = video_index[order] != rearrange(video_index, "q -> q 1")
    first = torch.where(other.any(dim=1), other.float().argmax(dim=1), torch.zeros_like(video_index))
    return order[torch.arange(q, device=video_index.device), first]


def expand_queries(x: torch.Tensor, video_index: torch.Tensor) -> torch.Tensor:
    """(b, ...) per video -> (q, ...) per query."""
    return x[video_index]



# ----- the head around a reference forward -------------------------------------------------------

class DetrHead(nn.Module):
    """A published head on vmr's towers. Per query: its video's pooled frame features (L2-normalised,
    with the frames' time endpoints appended: the references' ``video_tef``) and its sentence's token
    features (L2-normalised) enter ``reference_forward``, the reference model's forward with its
    signature (masks are floats, 1 on valid positions). Here are the modules both references build
    alike; subclasses add their transformer and saliency layers, their forward and saliency loss.
    ``slot_width``: the width of each slot's learned query (Moment-DETR: d; QD-DETR: a 2-d anchor)."""

    def __init__(self, cfg: DetrConfig, video_width: int, text_width: int, slot_width: int):
        super().__init__()
        self.cfg = cfg
        self.video_width = video_width + (2 if cfg.tef else 0)  # the reference's v_feat_dim
        d = cfg.hidden_dim
        self.txt_position_embed = TextPositions(cfg.max_q_l, d, cfg.input_dropout)
        if not cfg.use_txt_pos:  # built (checkpoints hold it) but unused: no gradient, which DDP requires
            self.txt_position_embed.requires_grad_(False)
        self.span_embed = MLP(d, d, 2, 3)
        self.class_embed = nn.Linear(d, 2)  # 0: foreground, 1: background
        self.query_embed = nn.Embedding(cfg.num_queries, slot_width)
        self.input_txt_proj = input_projection(text_width, d, cfg.n_input_proj, cfg.input_dropout)
        self.input_vid_proj = input_projection(self.video_width, d, cfg.n_input_proj, cfg.input_dropout)

    def text_positions(self, text: torch.Tensor) -> torch.Tensor:
        """The text tokens' positions: learned with ``use_txt_pos``, else zeros (the references' default)."""
        return self.txt_position_embed(text) if self.cfg.use_txt_pos else torch.zeros_like(text)

    def reference_forward(self, src_txt, src_txt_mask, src_vid, src_vid_mask, video_index=None) -> dict:
        raise NotImplementedError

    @staticmethod
    def saliency_loss_of(outputs: dict, targets: DetrTargets, cfg: DetrConfig) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, words: torch.Tensor, sentence: torch.Tensor, frame_mask: torch.Tensor,
                word_mask: torch.Tensor, video_index: torch.Tensor) -> dict:
        """tokens (b, t, k, c): the pooled frame embedding first (what the references were trained
        on: one CLIP image embedding per clip); words (q, l, c) with word_mask (q, l)."""
        video = tokens[:, :, 0].float()
        if self.cfg.normalize_video:
            video = l2_normalise(video)
        mask = expand_queries(frame_mask, video_index).float()  # (q, t)
        video = expand_queries(video, video_index) * rearrange(mask, "q t -> q t 1")
        if self.cfg.tef:
            video = torch.cat([video, time_endpoints(mask)], dim=-1)
        text = l2_normalise(words.float()) if self.cfg.normalize_text else words.float()
        text_mask = word_mask.float()
        # A sentence without any token (a padding query of a fixed-size batch) keeps its first one, so
        # that no attention row is empty; such queries count in no loss.
        text_mask[:, 0] = torch.where(text_mask.sum(dim=1) == 0, 1.0, text_mask[:, 0])
        text = text * rearrange(text_mask, "q l -> q l 1")
        dtype = next(self.parameters()).dtype  # normalised in float32, then the weights' dtype (bf16 under ZeRO)
        return self.reference_forward(text.to(dtype), text_mask, video.to(dtype), mask, video_index)

    def losses(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return batch_losses(outputs, batch, self.cfg, type(self).saliency_loss_of)

    def saliency_loss(self, outputs: dict, targets: DetrTargets) -> torch.Tensor:
        return type(self).saliency_loss_of(outputs, targets, self.cfg)

    def frame_outputs(self, outputs: dict, own=None, offset=None, video_duration=None) -> list[dict]:
        return proposals(outputs, own, offset, video_duration, self.cfg)


def batch_losses(outputs: dict, batch: dict, cfg: DetrConfig, saliency_loss) -> dict[str, torch.Tensor]:
    """The references' weighted criterion on the loader's batch (padding queries left out)."""
    keep = batch["query_mask"].bool() if "query_mask" in batch else torch.ones(
        len(outputs["frame_mask"]), dtype=torch.bool, device=outputs["frame_mask"].device)
    index = keep.nonzero().squeeze(1)
    picked = {k: v[index] for k, v in outputs.items() if torch.is_tensor(v) and not k.startswith("aux_")}
    for key in ("aux_pred_logits", "aux_pred_spans"):
        if key in outputs:
            picked[key] = outputs[key][:, index]
    rows = {k: batch[k][index] for k in QUERY_KEYS if k in batch}
    targets = batch_targets(rows, picked["duration"], picked["frame_mask"])
    result = detr_losses(picked, targets, cfg, lambda o, t: saliency_loss(o, t, cfg))
    result.pop("matched")
    return result


def proposals(outputs: dict, own: torch.Tensor | None, offset: torch.Tensor | None,
              video_duration: torch.Tensor | None, cfg: DetrConfig) -> list[dict]:
    """Per query: its moment slots as proposals in seconds of the whole video (``starts``,
    ``ends``, ``scores``: the references' post-processing), and per valid frame ``times``,
    ``saliency`` (rounded to float16, as the references write it) and ``relevance`` (its sigmoid,
    for display). With several windows a proposal is kept by the window that owns its centre."""
    mask, times = outputs["frame_mask"].cpu(), outputs["frame_times"].double().cpu()
    duration = outputs["duration"].double().cpu()
    saliency = outputs["saliency_scores"].float().cpu().half().float()
    q, t = mask.shape
    offset = torch.zeros(q, dtype=torch.float64) if offset is None else offset.double().cpu()
    total = duration + offset if video_duration is None else video_duration.double().cpu()
    frames = torch.arange(t)
    clip = cfg.clip_length
    results = []
    for i in range(q):
        valid = mask[i]
        reported = valid if own is None else valid & (own[i, 0] <= frames) & (frames < own[i, 1])
        step = float(times[i][valid][1:].sub(times[i][valid][:-1]).median()) if int(valid.sum()) > 1 else 0.0
        windows = ranked_windows(outputs["pred_logits"][i], outputs["pred_spans"][i], float(duration[i]),
                                 clip if clip > 0 else step)
        # The window owns the centres between its first and last reported frames, and beyond them
        # where it reports the first (last) valid frame: a whole video in one window keeps every slot.
        first, last = (int(x) for x in valid.nonzero()[[0, -1], 0]) if bool(valid.any()) else (0, -1)
        lo = -math.inf if own is None or own[i, 0] <= first else float(times[i][reported].min()) - step / 2
        hi = math.inf if own is None or own[i, 1] > last else float(times[i][reported].max()) + step / 2
        kept = [(s, e, p) for s, e, p in windows if lo <= (s + e) / 2 < hi]
        shift, end = float(offset[i]), float(total[i])
        results.append({
            "times": (times[i][reported] + shift).tolist(),
            "relevance": torch.sigmoid(saliency[i][reported]).tolist(),
            "saliency": saliency[i][reported].tolist(),
            "starts": [min(s + shift, end) for s, _, _ in kept], "ends": [min(e + shift, end) for _, e, _ in kept],
            "scores": [p for _, _, p in kept]})
    return results
