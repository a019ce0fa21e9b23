"""Moment-DETR (Lei et al., NeurIPS 2021), numerically identical to jayleicn/moment_detr at b7e553a:
video and text tokens concatenated -> a post-norm transformer encoder -> a DETR decoder of
``num_queries`` learned slots -> per slot a foreground logit and a (centre, width) span; a
saliency score per frame from the encoder's video tokens. Parameter names are the reference's.

Legend: q queries, t frames, l text tokens, s = t + l, n slots, k decoder layers, d width.
Inside the transformer tensors are sequence-first, (s, q, d), as in torch.nn.MultiheadAttention's
default layout that the reference uses.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vmr.config import DetrConfig
from vmr.model.heads.detr import (
    DetrHead,
    DetrTargets,
    decoder_layers_output,
    frame_positions,
    saliency_hinge,
)


def with_position(x: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
    return x if position is None else x + position


class EncoderLayer(nn.Module):
    """Post-norm self-attention + feed-forward; positions added to queries and keys only."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, activation: nn.Module | None = None):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        if activation is not None:  # QD-DETR: a learned PReLU per layer (a parameter, hence a module)
            self.activation = activation

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x) if hasattr(self, "activation") else F.relu(x)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        qk = with_position(x, position)
        x = self.norm1(x + self.dropout1(self.self_attn(qk, qk, value=x, key_padding_mask=padding)[0]))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(self.act(self.linear1(x))))))


class DecoderLayer(nn.Module):
    """Post-norm slot self-attention, cross-attention to the memory, feed-forward."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, slots, memory, padding, position, slot_position):
        qk = with_position(slots, slot_position)
        slots = self.norm1(slots + self.dropout1(self.self_attn(qk, qk, value=slots)[0]))
        attended = self.multihead_attn(query=with_position(slots, slot_position), key=with_position(memory, position),
                                       value=memory, key_padding_mask=padding)[0]
        slots = self.norm2(slots + self.dropout2(attended))
        return self.norm3(slots + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(slots))))))


class Layers(nn.Module):
    """A stack of identical layers (the reference's ``layers`` ModuleList, deep copies of one)."""

    def __init__(self, layer: nn.Module, count: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(count))
        if norm is not None:
            self.norm = norm


class Transformer(nn.Module):
    """Encoder over [video; text], decoder over learned slots; returns every decoder layer's
    normalised slots (k, q, n, d) and the memory (q, s, d)."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.encoder = Layers(EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout), cfg.enc_layers)
        self.decoder = Layers(DecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout), cfg.dec_layers,
                              nn.LayerNorm(d))
        for p in self.parameters():  # the reference's initialisation
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model = d

    def forward(self, src, padding, slot_embed, position):
        q = src.shape[0]
        src, position = rearrange(src, "q s d -> s q d"), rearrange(position, "q s d -> s q d")
        slot_position = repeat(slot_embed, "n d -> n q d", q=q)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, padding, position)
        slots, states = torch.zeros_like(slot_position), []
        for layer in self.decoder.layers:
            slots = layer(slots, memory, padding, position, slot_position)
            states.append(self.decoder.norm(slots))
        return rearrange(torch.stack(states), "k n q d -> k q n d"), rearrange(memory, "s q d -> q s d")


class MomentDETRHead(DetrHead):
    def __init__(self, cfg: DetrConfig, video_width: int, text_width: int):
        super().__init__(cfg, video_width, text_width, slot_width=cfg.hidden_dim)
        self.transformer = Transformer(cfg)
        self.saliency_proj = nn.Linear(cfg.hidden_dim, 1)

    def reference_forward(self, src_txt, src_txt_mask, src_vid, src_vid_mask, video_index=None) -> dict:
        """The reference's ``MomentDETR.forward``: (q, n, 2) ``pred_logits``, (q, n, 2) sigmoid
        ``pred_spans`` (centre, width), (q, t) ``saliency_scores``, and the auxiliary layers'."""
        video, text = self.input_vid_proj(src_vid), self.input_txt_proj(src_txt)
        t = video.shape[1]
        src = torch.cat([video, text], dim=1)  # (q, t + l, d)
        valid = torch.cat([src_vid_mask, src_txt_mask], dim=1).bool()
        position = torch.cat([frame_positions(src_vid_mask, self.cfg.hidden_dim).to(text.dtype),
                              self.text_positions(text)], dim=1)
        states, memory = self.transformer(src, ~valid, self.query_embed.weight, position)
        out = decoder_layers_output(self.class_embed(states), self.span_embed(states).sigmoid(), self.cfg.aux_loss)
        out["saliency_scores"] = rearrange(self.saliency_proj(memory[:, :t]), "q t 1 -> q t")
        return out

    @staticmethod
    def saliency_loss_of(outputs: dict, targets: DetrTargets, cfg: DetrConfig) -> torch.Tensor:
        return saliency_hinge(outputs["saliency_scores"].float(), targets, cfg.saliency_margin)
