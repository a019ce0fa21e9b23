"""QD-DETR (Moon et al., CVPR 2023), numerically identical to wjun0830/QD-DETR at 56c63b2:
query-dependent video tokens (each frame cross-attends to the sentence), a learned global token,
a self-attention encoder over [global; video], an anchor (DAB-style) decoder whose slots refine a
(centre, width) reference per layer, saliency as the frames' agreement with the global token, and
the same for the video paired with another query's sentence (its negative-pair saliency). Parameter
names are the reference's; every layer's feed-forward uses a learned PReLU, as the reference builds it.

Legend: q queries, t frames, l text tokens, n slots, k decoder layers, d width (256: the anchors'
sine embedding is 2 x 128), h heads. Inside the transformer tensors are sequence-first, (s, q, d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vmr.config import DetrConfig
from vmr.model.heads.detr import (
    MLP,
    DetrHead,
    DetrTargets,
    decoder_layers_output,
    frame_positions,
    other_video_queries,
    saliency_hinge,
    sine_features,
)
from vmr.model.heads.moment_detr import EncoderLayer, Layers, with_position

ANCHOR_WIDTH = 128  # per coordinate of the anchors' sine embedding (the reference's constant)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def anchor_embedding(anchors: torch.Tensor) -> torch.Tensor:
    """(n, q, 2) (centre, width) in [0, 1] -> (n, q, 256) sine features of the centre, then the width."""
    return torch.cat([sine_features(anchors[..., 0] * 2 * math.pi, ANCHOR_WIDTH),
                      sine_features(anchors[..., 1] * 2 * math.pi, ANCHOR_WIDTH)], dim=-1)


class ProjectionFreeAttention(nn.Module):
    """Multi-head attention without input projections (the layer projects first): heads of width
    (query width / h) for scores and (value width / h) for values, then an output projection."""

    def __init__(self, heads: int, value_width: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.out_proj = nn.Linear(value_width, value_width)

    def forward(self, query, key, value, padding: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (rearrange(x, "s b (h e) -> b h s e", h=self.heads) for x in (query, key, value))
        allowed = None if padding is None else rearrange(~padding, "b s -> b 1 1 s")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(rearrange(out, "b h s e -> s b (h e)"))


class TextToVideoLayer(EncoderLayer):
    """Video tokens attend to the sentence only (queries: frames with positions; keys: words with
    positions; values: words); the global token and the words pass through unchanged. As in the
    reference, the feed-forward's residual adds to the attention's sum before its norm, and the
    attention also gets the reference's extra mask (padded frame x padded word) repeated head-major,
    while attention masks are batch-major: head h of query b is given the mask of query
    (b x heads + h) mod q. Kept as it is, since published weights were trained with it."""

    def forward(self, x: torch.Tensor, padding: torch.Tensor, position: torch.Tensor, frames: int) -> torch.Tensor:
        qk = with_position(x, position)
        video, words = slice(1, frames + 1), slice(frames + 1, None)
        pairs = padding[:, video].float()[:, :, None] @ padding[:, words].float()[:, None, :]
        extra = pairs.bool().repeat(self.self_attn.num_heads, 1, 1)  # (heads x q, t, l), head-major
        attended = self.self_attn(qk[video], qk[words], value=x[words], attn_mask=extra,
                                  key_padding_mask=padding[:, words])[0]
        summed = x[video] + self.dropout1(attended)
        fed = self.linear2(self.dropout(self.act(self.linear1(self.norm1(summed)))))
        video_tokens = self.norm2(summed + self.dropout2(fed))
        return torch.cat([x[:1], video_tokens, x[words]])


class AnchorDecoderLayer(nn.Module):
    """Slot self-attention on content + anchor position, cross-attention whose per-head queries and
    keys concatenate content and position (conditional DETR), feed-forward. Only the first layer
    adds the anchor's position to the cross-attention's content query (``ca_qpos_proj``)."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, first: bool):
        super().__init__()
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
            setattr(self, name, nn.Linear(d, d))
        if first:
            self.ca_qpos_proj = nn.Linear(d, d)
        self.self_attn = ProjectionFreeAttention(heads, d, dropout)
        self.cross_attn = ProjectionFreeAttention(heads, d, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = nn.PReLU()
        self.heads = heads

    def forward(self, slots, memory, padding, position, slot_position, slot_sine):
        q = self.sa_qcontent_proj(slots) + self.sa_qpos_proj(slot_position)
        k = self.sa_kcontent_proj(slots) + self.sa_kpos_proj(slot_position)
        slots = self.norm1(slots + self.dropout1(self.self_attn(q, k, self.sa_v_proj(slots))))

        q, k, key_position = self.ca_qcontent_proj(slots), self.ca_kcontent_proj(memory), self.ca_kpos_proj(position)
        if hasattr(self, "ca_qpos_proj"):
            q, k = q + self.ca_qpos_proj(slot_position), k + key_position
        per_head = "s b (h e) -> s b h e"
        q = torch.cat([rearrange(q, per_head, h=self.heads),
                       rearrange(self.ca_qpos_sine_proj(slot_sine), per_head, h=self.heads)], dim=-1)
        k = torch.cat([rearrange(k, per_head, h=self.heads), rearrange(key_position, per_head, h=self.heads)], dim=-1)
        attended = self.cross_attn(rearrange(q, "s b h e -> s b (h e)"), rearrange(k, "s b h e -> s b (h e)"),
                                   self.ca_v_proj(memory), padding)
        slots = self.norm2(slots + self.dropout2(attended))
        return self.norm3(slots + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(slots))))))


class AnchorDecoder(nn.Module):
    """Slots refine their anchors layer by layer (``bbox_embed``); the anchors' sine embedding is
    scaled by the content (``query_scale``) and its width part modulated (``ref_anchor_head``)."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.layers = nn.ModuleList(AnchorDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, first=i == 0)
                                    for i in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(d)
        self.query_scale = MLP(d, d, d, 2)
        self.ref_point_head = MLP(d, d, d, 2)
        self.bbox_embed = MLP(d, d, 2, 3)
        self.ref_anchor_head = MLP(d, d, 1, 2)

    def forward(self, slots, memory, padding, position, anchors_unsigmoid):
        anchors = anchors_unsigmoid.sigmoid()
        references, states = [anchors], []
        for i, layer in enumerate(self.layers):
            sine = anchor_embedding(anchors).to(slots.dtype)
            slot_position = self.ref_point_head(sine)
            if i > 0:
                sine = sine * self.query_scale(slots)
            sine = sine * rearrange(self.ref_anchor_head(slots).sigmoid()[..., 0] / anchors[..., 1], "n q -> n q 1")
            slots = layer(slots, memory, padding, position, slot_position, sine)
            refined = (self.bbox_embed(slots) + inverse_sigmoid(anchors)).sigmoid()
            if i < len(self.layers) - 1:
                references.append(refined)
            anchors = refined.detach()
            states.append(self.norm(slots))
        return torch.stack(states), torch.stack(references)  # (k, n, q, d), (k, n, q, 2)


class Transformer(nn.Module):
    def __init__(self, cfg: DetrConfig):
        super().__init__()
        d, h, ff, p = cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout
        self.t2v_encoder = Layers(TextToVideoLayer(d, h, ff, p, nn.PReLU()), cfg.enc_layers)
        self.encoder = Layers(EncoderLayer(d, h, ff, p, nn.PReLU()), cfg.enc_layers)
        self.decoder = AnchorDecoder(cfg)
        nn.init.zeros_(self.decoder.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.decoder.bbox_embed.layers[-1].bias)
        for q in self.parameters():  # the reference's initialisation
            if q.dim() > 1:
                nn.init.xavier_uniform_(q)
        self.d_model = d

    def encode(self, src, padding, position, frames: int):
        """[global; video; text] -> the memory of [global; video] (s, q, d)."""
        for layer in self.t2v_encoder.layers:
            src = layer(src, padding, position, frames)
        src, padding, position = src[: frames + 1], padding[:, : frames + 1], position[: frames + 1]
        for layer in self.encoder.layers:
            src = layer(src, padding, position)
        return src

    def forward(self, src, padding, anchors, position, frames: int, decode: bool = True):
        q = src.shape[0]
        src, position = rearrange(src, "q s d -> s q d"), rearrange(position, "q s d -> s q d")
        memory = self.encode(src, padding, position, frames)
        local = memory[1:]
        if not decode:
            return None, None, rearrange(local, "s q d -> q s d"), memory[0]
        states, references = self.decoder(torch.zeros(anchors.shape[0], q, src.shape[-1], device=src.device, dtype=src.dtype), local,
                                          padding[:, 1: frames + 1], position[1: frames + 1],
                                          repeat(anchors, "n two -> n q two", q=q))
        return (rearrange(states, "k n q d -> k q n d"), rearrange(references, "k n q two -> k q n two"),
                rearrange(local, "s q d -> q s d"), memory[0])


class QDDETRHead(DetrHead):
    def __init__(self, cfg: DetrConfig, video_width: int, text_width: int):
        super().__init__(cfg, video_width, text_width, slot_width=2)  # the slots' anchors, before the sigmoid
        d = cfg.hidden_dim
        self.transformer = Transformer(cfg)
        self.saliency_proj1, self.saliency_proj2 = nn.Linear(d, d), nn.Linear(d, d)
        self.global_rep_token = nn.Parameter(torch.randn(d))
        self.global_rep_pos = nn.Parameter(torch.randn(d))

    def saliency(self, video_memory: torch.Tensor, global_memory: torch.Tensor) -> torch.Tensor:
        agreement = self.saliency_proj1(video_memory) * rearrange(self.saliency_proj2(global_memory), "q d -> q 1 d")
        return agreement.sum(-1) / math.sqrt(self.cfg.hidden_dim)

    def reference_forward(self, src_txt, src_txt_mask, src_vid, src_vid_mask, video_index=None) -> dict:
        """The reference's ``QDDETR.forward``: (q, n, 2) ``pred_logits`` and ``pred_spans``, (q, t)
        ``saliency_scores`` and ``saliency_scores_neg`` (the video with another video's sentence:
        ``video_index`` picks it; the reference's shift by one when absent), and the auxiliary layers'."""
        video, text = self.input_vid_proj(src_vid), self.input_txt_proj(src_txt)
        q, t = video.shape[:2]
        position = torch.cat([repeat(self.global_rep_pos, "d -> q 1 d", q=q),
                              frame_positions(src_vid_mask, self.cfg.hidden_dim).to(text.dtype),
                              self.text_positions(text)], dim=1)
        token = repeat(self.global_rep_token, "d -> q 1 d", q=q)
        always = torch.ones(q, 1, dtype=torch.bool, device=video.device)

        def run(words, words_mask, decode):
            src = torch.cat([token, video, words], dim=1)
            valid = torch.cat([always, src_vid_mask.bool(), words_mask.bool()], dim=1)
            return self.transformer(src, ~valid, self.query_embed.weight, position, t, decode)

        states, references, memory, global_memory = run(text, src_txt_mask, True)
        coords = (self.span_embed(states) + inverse_sigmoid(references)).sigmoid()
        out = decoder_layers_output(self.class_embed(states), coords, self.cfg.aux_loss)
        out["saliency_scores"] = self.saliency(memory, global_memory)
        # Negative pairs: the same video with another query's sentence should be salient nowhere.
        other = (torch.roll(torch.arange(q, device=video.device), -1) if video_index is None
                 else other_video_queries(video_index))
        _, _, memory_neg, global_neg = run(text[other], src_txt_mask[other], False)
        out["saliency_scores_neg"] = self.saliency(memory_neg, global_neg)
        out["video_mask"] = src_vid_mask
        return out

    @staticmethod
    def saliency_loss_of(outputs: dict, targets: DetrTargets, cfg: DetrConfig) -> torch.Tensor:
        """The reference's loss_saliency: negative-pair BCE + rank-contrastive (thresholds 1..11 of
        the 0-12 scores, temperature 0.5, over the query's and its negative pair's frames) + hinge."""
        mask = outputs["video_mask"].float()
        valid = targets.saliency_valid.to(mask)
        negative = outputs["saliency_scores_neg"].float()
        per_query = (-torch.log(1.0 - torch.sigmoid(negative)) * mask).sum(dim=1)
        loss_neg_pair = (per_query * valid).sum() / valid.sum().clamp(min=1)

        scores = torch.cat([outputs["saliency_scores"].float(), negative], dim=1)
        labels = torch.cat([targets.saliency_all.to(mask), torch.zeros_like(targets.saliency_all.to(mask))], dim=1)
        both = mask.repeat(1, 2)
        scores = both * scores + (1.0 - both) * -1e3
        rank = scores.new_zeros(())
        for threshold in range(1, 12):
            positive = (labels >= threshold) & rearrange(valid.bool(), "q -> q 1")
            if positive.sum() == 0:
                continue
            has_positive = positive.sum(dim=1) > 0
            logits = scores / 0.5  # no label exceeds 100: the reference's "drop" mask keeps every frame
            logits = logits - logits.max(dim=1, keepdim=True)[0]
            log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True) + 1e-6)
            mean_positive = (positive * log_prob * both).sum(1) / (positive.sum(1) + 1e-6)
            rank = rank + (-mean_positive * has_positive).sum() / valid.sum().clamp(min=1)
        rank = rank / 12
        return saliency_hinge(outputs["saliency_scores"].float(), targets, cfg.saliency_margin) + rank + loss_neg_pair
