"""vmr's own head: the query pools each frame's patch grid (spatial conditioning, with the patches'
changes over neighbouring frames), einops temporal self-attention and text cross-attention blocks,
then per frame a relevance logit, distances to its moment's boundaries and a saliency score. Every
frame proposes the moment its boundaries span, scored by its relevance.

Legend: b videos, t frames, p patches per frame, q queries, l text tokens, c the towers' width,
d the head's width. Each video's features are copied to its queries by ``video_index`` (q,).
"""

from __future__ import annotations

from itertools import compress

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vmr.config import ModelConfig
from vmr.model.blocks import Block, QueryPool, sinusoidal_positions
from vmr.model.corpus import CorpusKeys
from vmr.model.losses import moment_losses


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(..., k, c) frame tokens -> the slots a query pools over: the patch grid after the pooled
    embedding, or for pooled-only features (k = 1) the frame's one vector."""
    return tokens[..., 1:, :] if tokens.shape[-2] > 1 else tokens


class VmrHead(nn.Module):
    def __init__(self, config: ModelConfig, video_width: int, text_width: int, sentence_width: int):
        super().__init__()
        self.config = config
        d, heads, drop = config.hidden_dim, config.num_heads, config.dropout
        self.frame_in, self.patch_in = nn.Linear(video_width, d), nn.Linear(video_width, d)
        self.word_in, self.sentence_in = nn.Linear(text_width, d), nn.Linear(sentence_width, d)
        self.pool = QueryPool(d, heads, motion=config.motion, span=config.motion_span)
        self.norm_in = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(d, heads, drop, config.temporal_modeling) for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(d)
        self.relevance_head = nn.Linear(d, 1)
        self.boundary_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 2))
        self.saliency_head = nn.Linear(d, 1, bias=False)  # a ranking loss cannot see a shift
        # Only with model.corpus: bundles trained without it load as they were saved.
        self.keys = CorpusKeys(d, config.corpus.key_dim) if config.corpus.enabled else None
        # Whether the query's event is in this video at all, comparable across videos (model.corpus).
        # It reads the layers' output without training them: in-video ranking stays relevance's alone.
        self.presence_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)) \
            if config.corpus.enabled else None

    def prepare(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """(b, t, k, c) tokens -> what the head makes of them before it reads a sentence: ``frames``
        (b, t, d), the patches' pooling ``keys`` and ``values`` (b, t, p, d). A collection index stores
        them per window, and a search runs only the rest (``forward(..., prepared=...)``)."""
        tokens = tokens.to(self.frame_in.weight.dtype)
        keys, values = self.pool.prepare(self.patch_in(patch_grid(tokens)), frame_mask)
        return {"frames": self.frame_in(tokens[:, :, 0]), "keys": keys, "values": values}

    def forward(self, tokens, words, sentence, frame_mask, word_mask, video_index,
                prepared: dict | None = None) -> dict[str, torch.Tensor]:
        """(q, t) ``relevance_logits`` and ``saliency``, (q, t, 2) ``boundaries`` (distances from each
        frame to its moment's start and end, over the duration); with model.corpus, the compact
        ``frame_keys`` (b, t, r) and ``query_keys`` (q, r) (not from ``prepared`` rows), and (q, t) ``presence_logits``, whose best
        frame says whether the event is in the video at all (vmr/model/corpus.py)."""
        dtype = self.frame_in.weight.dtype
        from_index = prepared is not None
        prepared = self.prepare(tokens, frame_mask) if prepared is None else prepared
        frames = prepared["frames"].to(dtype)  # (b, t, d)
        words, sentence = self.word_in(words.to(dtype)), self.sentence_in(sentence.to(dtype))
        # At this point each query sees its video's frames through what it asks for.
        x = self.pool.attend(sentence, prepared["keys"].to(dtype), prepared["values"].to(dtype), video_index) \
            + frames[video_index]  # (q, t, d)
        t = x.shape[1]
        x = self.norm_in(x) + sinusoidal_positions(t, x.shape[-1], device=x.device, dtype=x.dtype)
        mask = frame_mask[video_index]
        for block in self.blocks:
            x = block(x, mask, words, word_mask)
        x = self.norm_out(x)
        outputs = {"relevance_logits": rearrange(self.relevance_head(x), "q t 1 -> q t"),
                   "boundaries": F.softplus(self.boundary_head(x)),
                   "saliency": rearrange(self.saliency_head(x), "q t 1 -> q t")}
        if self.keys is not None:
            # The keys and presence read the layers without training them (vmr/model/corpus.py).
            outputs["presence_logits"] = rearrange(self.presence_head(x.detach()), "q t 1 -> q t")
            if not from_index:  # a search's rerank has its keys in the index already
                outputs.update(frame_keys=self.keys.frames(frames.detach(), frame_mask),
                               query_keys=self.keys.queries(sentence.detach()))
        return outputs

    def frame_keys(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(b, t, k, c) tokens -> (b, t, r) the keys a collection index stores (model.corpus)."""
        return self.keys.frames(self.frame_in(tokens[:, :, 0].to(self.frame_in.weight.dtype)).detach(), frame_mask)

    def query_keys(self, sentence: torch.Tensor) -> torch.Tensor:
        """(q, c) sentence embeddings -> (q, r) the keys a collection index is asked with."""
        return self.keys.queries(self.sentence_in(sentence.to(self.sentence_in.weight.dtype)).detach())

    def losses(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return moment_losses(outputs, batch, self.config)

    def frame_outputs(self, outputs: dict, own=None, offset=None, video_duration=None) -> list[dict]:
        return frame_outputs(outputs, own, offset, video_duration)


def frame_outputs(outputs: dict, own: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                  video_duration: torch.Tensor | None = None) -> list[dict]:
    """Per query, the frames it reports as plain lists in seconds of the whole video: ``times``,
    ``relevance`` probabilities, ``saliency`` scores, and the moment each frame proposes
    (``starts``/``ends``, its boundary head, clipped to the window and the video; ``scores``, its
    relevance). ``own`` (q, 2) picks the frames of each query's window that it reports (default:
    every valid frame), ``offset`` (q,) is where the window starts in its video,
    ``video_duration`` (q,) the video's length."""
    probs = torch.sigmoid(outputs["relevance_logits"].float()).cpu()
    saliency = outputs["saliency"].float().cpu()
    bounds = outputs["boundaries"].float().cpu()
    presence = torch.sigmoid(outputs["presence_logits"].float()).cpu() if "presence_logits" in outputs else None
    times, duration = outputs["frame_times"].double().cpu(), outputs["duration"].double().cpu()
    mask = outputs["frame_mask"].cpu().clone()
    q, t = mask.shape
    if own is not None:
        index = torch.arange(t)
        mask &= (own[:, :1] <= index) & (index < own[:, 1:])
    offset = torch.zeros(q, dtype=torch.float64) if offset is None else offset.double().cpu()
    total = duration + offset if video_duration is None else video_duration.double().cpu()
    # Every row's numbers at once, then one list per row: a search reads tens of rows per query.
    length, shift, edge = duration[:, None], offset[:, None], total[:, None]
    start = (times - bounds[..., 0] * length.float()).clamp(min=0).minimum(length) + shift
    end = (times + bounds[..., 1] * length.float()).clamp(min=0).minimum(length) + shift
    columns = {"times": times + shift, "relevance": probs, "saliency": saliency,
               "starts": start.clamp(min=0).minimum(edge), "ends": end.clamp(min=0).minimum(edge),
               **({"presence": presence} if presence is not None else {})}
    columns = {name: values.tolist() for name, values in columns.items()}
    results = []
    for i, valid in enumerate(mask.tolist()):
        row = {name: list(compress(values[i], valid)) for name, values in columns.items()}
        results.append({**row, "scores": row["relevance"]})
    return results
