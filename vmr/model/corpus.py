"""Training for a collection (``model.corpus``): scores that mean the same in every video.

A model trained only on queries that occur in their video learns to pick the best moment of a video
that holds the event; it never sees a video that lacks it, so its scores do not compare across videos
(a green circle shrinking elsewhere outranks "a green circle grows"). Two objectives add the missing
negatives, both from other videos of the batch that do not hold the query's sentence (every sentence
a video holds is known from its annotations; another window of the same video is never a negative):

- **Video level.** Each frame gets a compact key (its pooled embedding and its change across its
  neighbours, so that "grows" and "shrinks" can differ) and each query a key; a video's score for a
  query is its best frame's dot product, the score ``vmr search``'s approximate-nearest-neighbour
  index ranks videos by. A contrastive loss over every video of the *global* batch (keys gathered
  from every process, with gradients to the local ones: more processes give more negatives) makes
  the query's own video score highest.
- **Moment level.** Each query is also run through the whole head on ``negatives`` other videos of its
  process; their frames' relevance is trained towards 0, and a presence head (one logit per frame, a
  video's presence its best frame's) towards 1 in the query's own window and 0 in the negatives. A
  search ranks moments of different videos by relevance x presence.
- **Near-miss sentences** (``sentences``). A few videos of a batch rarely hold the event a query is
  confused with across a collection (the same colour and action, another shape): about one in ten.
  So the pairs are also made from the other side: each query's own video is run with the ``sentences``
  recently seen sentences that share the most words with the query but that the video does not hold
  ("a red square grows" for a video where only a red circle grows), all of its frames towards 0. Only
  the sentence differs, so only reading it in full tells the pairs apart. On data whose sentences are
  paraphrases of each other (free-form captions), the nearest sentence may describe the same event:
  there it stays off.

The key and presence layers read detached inputs and their losses weigh little (vmr.config.CorpusConfig):
only the relevance term trains the shared layers, so the in-video figures stay those of the head.

Legend: b videos, t frames, q queries, r key width, d the head's width, n negative pairs, w processes.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vmr.config import CorpusConfig


class CorpusKeys(nn.Module):
    """The compact keys of frames and queries (unit length, ``key_dim`` wide)."""

    def __init__(self, d: int, key_dim: int):
        super().__init__()
        self.frame = nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, key_dim))
        self.query = nn.Linear(d, key_dim)

    def frames(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(b, t, d) frame embeddings -> (b, t, r) keys. A frame's motion is its next frame minus its
        previous one (itself at a video's ends and beside padding)."""
        valid = rearrange(frame_mask, "b t -> b t 1")
        prev = torch.where(F.pad(valid, (0, 0, 1, 0))[:, :-1], F.pad(frames, (0, 0, 1, 0))[:, :-1], frames)
        nxt = torch.where(F.pad(valid, (0, 0, 0, 1))[:, 1:], F.pad(frames, (0, 0, 0, 1))[:, 1:], frames)
        return F.normalize(self.frame(torch.cat([frames, nxt - prev], dim=-1)).float(), dim=-1)

    def queries(self, sentence: torch.Tensor) -> torch.Tensor:
        """(q, d) sentence embeddings -> (q, r) keys."""
        return F.normalize(self.query(sentence).float(), dim=-1)


def text_hash(text: str) -> int:
    """A sentence's or a video id's number, the same in every process (Python's hash() is not)."""
    return zlib.crc32(text.encode("utf-8"))


def words(sentence: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", sentence.lower()))


class SentenceBank:
    """The ``size`` sentences a process saw last (every sentence its batches' videos hold), to draw
    near misses from: for a query, those sharing the most words with it (Jaccard of the word sets;
    ties drawn at random) that its video does not hold and that are not the same words reordered."""

    def __init__(self, size: int = 2048, seed: int = 0):
        self.size, self.rng, self.seen = size, random.Random(seed), OrderedDict()

    def add(self, sentences) -> None:
        for sentence in sentences:
            self.seen[sentence] = words(sentence)
            self.seen.move_to_end(sentence)
        while len(self.seen) > self.size:
            self.seen.popitem(last=False)

    def near_misses(self, sentence: str, held, k: int) -> list[str]:
        return nearest_sentences(sentence, self.seen, k, held, self.rng.random)


def nearest_sentences(sentence: str, pool: dict, k: int, held=(), tie=None) -> list[str]:
    """The ``k`` sentences of ``pool`` (sentence -> its words) sharing the most words with ``sentence``
    (Jaccard of the word sets), never one of ``held`` nor its own words reordered; ties drawn by
    ``tie()`` (a random number), else alphabetical. Training's near misses and the search's contrast."""
    own = words(sentence)
    scored = sorted((-len(own & w) / len(own | w), -tie() if tie else 0.0, s) for s, w in pool.items()
                    if s not in held and w != own)
    return [s for *_, s in scored[:k]]


class SentencePool:
    """A fixed pool of sentences to draw near misses from, as ``nearest_sentences`` does (ties
    alphabetical) without scanning every sentence in Python per query: a search's contrast pool may
    be a whole caption file (100,000 sentences took 277 ms a query that way on 2 cores). Built once:
    for each word, the sentences holding it; a query's overlaps are one count over its words' lists."""

    def __init__(self, sentences=()):
        import numpy as np

        self.sentences = sorted(set(sentences))  # alphabetical: ties keep that order
        vocabulary: dict[str, int] = {}
        postings: list[list[int]] = []
        sizes = []
        for row, sentence in enumerate(self.sentences):
            held = words(sentence)
            sizes.append(len(held))
            for word in held:
                column = vocabulary.setdefault(word, len(vocabulary))
                if column == len(postings):
                    postings.append([])
                postings[column].append(row)
        self.vocabulary, self.sizes = vocabulary, np.asarray(sizes, dtype=np.int64)
        self.postings = [np.asarray(rows, dtype=np.int64) for rows in postings]

    def __len__(self) -> int:
        return len(self.sentences)

    def nearest(self, sentence: str, k: int) -> list[str]:
        """``nearest_sentences(sentence, {s: words(s) for s in pool}, k)``, the same list."""
        import numpy as np

        if not self.sentences or k <= 0:
            return []
        own = words(sentence)
        lists = [self.postings[self.vocabulary[w]] for w in own if w in self.vocabulary]
        shared = np.bincount(np.concatenate(lists), minlength=len(self.sentences)) if lists \
            else np.zeros(len(self.sentences), dtype=np.int64)
        union = len(own) + self.sizes - shared
        score = shared / np.maximum(union, 1)  # the same float division as nearest_sentences'
        score[(shared == len(own)) & (self.sizes == len(own))] = -1.0  # its own words (reordered): never
        candidates = np.flatnonzero(score >= 0.0)
        if len(candidates) > k:  # the k-th best score, then every sentence tied with it, in order
            kth = np.partition(score[candidates], len(candidates) - k)[len(candidates) - k]
            candidates = candidates[score[candidates] >= kth]
        ranked = candidates[np.argsort(-score[candidates], kind="stable")][:k]
        return [self.sentences[i] for i in ranked]


def corpus_batch(batch: dict, cfg: CorpusConfig, bank: SentenceBank | None = None, tokenizer=None) -> dict:
    """The host's part, on a loader batch: ``negatives`` (n, 2) pairs (query row, video of the batch)
    for the moment level, each real query paired with up to ``cfg.negatives`` other videos that lack
    its sentence (the next ones in the batch, round); the numbers the video level compares across
    processes: ``query_hash`` (q,), ``video_hash`` (b,), ``sentence_hash`` (b, s) (-1: none).

    With ``cfg.sentences`` (and the process's ``bank`` and the model's ``tokenizer``), each real query's
    own video is also paired with that many near-miss sentences: their tokens are appended to the
    batch's text rows (after its q queries, read only through these pairs)."""
    videos, queries = batch["video_id"], batch["query"]
    owner = batch["video_index"].tolist()
    pairs = []
    for row, sentence in enumerate(queries):  # real queries only (padding comes after them)
        own, found = owner[row], 0
        for step in range(1, len(videos)):
            other = (own + step) % len(videos)
            if found == cfg.negatives:
                break
            if videos[other] != videos[own] and sentence not in batch["sentences"][other]:
                pairs.append((row, other))
                found += 1
    q = len(batch["video_index"])
    extra = {}
    if cfg.sentences and bank is not None and "text_features" not in batch:  # imported text: no tower to read them
        bank.add(s for held in batch["sentences"] for s in held)
        rows: dict[str, int] = {}
        for row, sentence in enumerate(queries):
            video = owner[row]
            for miss in bank.near_misses(sentence, set(batch["sentences"][video]), cfg.sentences):
                pairs.append((q + rows.setdefault(miss, len(rows)), video))
        if rows:
            ids = batch["text_ids"]
            text = tokenizer(list(rows), padding="max_length", truncation=True, max_length=ids.shape[1],
                             return_tensors="pt")
            extra = {"text_ids": torch.cat([ids, text["input_ids"].to(ids)]),
                     "text_mask": torch.cat([batch["text_mask"], text["attention_mask"].to(batch["text_mask"])])}
    most = max([len(s) for s in batch["sentences"]] + [1])
    sentences = [[text_hash(s) for s in held] + [-1] * (most - len(held)) for held in batch["sentences"]]
    device = batch["video_index"].device
    return {**batch, **extra, "negatives": torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2),
            "query_hash": torch.tensor([text_hash(s) for s in queries] + [-2] * (q - len(queries)), device=device),
            "video_hash": torch.tensor([text_hash(v) for v in videos], device=device),
            "sentence_hash": torch.tensor(sentences, dtype=torch.long, device=device)}


def split_negatives(outputs: dict, q: int) -> tuple[dict, dict]:
    """The head's outputs for the batch's own q queries, and for the negative pairs after them."""
    per_query = ("relevance_logits", "boundaries", "saliency", "frame_mask", "frame_times", "duration", "query_keys",
                 "presence_logits")
    own = {k: (v[:q] if k in per_query else v) for k, v in outputs.items()}
    return own, {k: outputs[k][q:] for k in per_query if k in outputs}


def _gather(tensor: torch.Tensor, grad: bool) -> torch.Tensor:
    """Every process's ``tensor`` (same shape everywhere) concatenated along dim 0; this process's
    own part is the tensor itself, with its gradient when ``grad`` (each process's loss trains its
    own keys, and the gradients are averaged over processes as usual); itself in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    if grad:
        parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def _pad_to(tensor: torch.Tensor, sizes: list[int], value) -> torch.Tensor:
    """``tensor`` padded with ``value`` at the end of its first len(sizes) dims up to ``sizes``."""
    pad = []
    for dim in reversed(range(tensor.dim())):
        pad += [0, (sizes[dim] - tensor.shape[dim]) if dim < len(sizes) else 0]
    return F.pad(tensor, pad, value=value)


def video_level_loss(own: dict, batch: dict, cfg: CorpusConfig) -> torch.Tensor:
    """Contrast of each query's own video against every other video of the global batch by key score
    (best frame's dot product), over queries with a moment in their window."""
    keys, mask = own["frame_keys"], batch["frame_mask"]  # (b, t, r), (b, t)
    sentences = batch["sentence_hash"]
    sizes = torch.tensor([keys.shape[0], keys.shape[1], sentences.shape[1]], device=keys.device)
    most = _gather(sizes[None], grad=False).amax(dim=0).tolist()  # same shapes in every process
    keys = _gather(_pad_to(keys, most[:2], 0.0), grad=True)  # (w b, t, r)
    mask = _gather(_pad_to(mask, most[:2], False), grad=False)
    video_hash = _gather(_pad_to(batch["video_hash"], most[:1], -3), grad=False)  # (w b,)
    sentences = _gather(_pad_to(sentences, [most[0], most[2]], -1), grad=False)  # (w b, s)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    target = batch["video_index"] + rank * most[0]  # each query's own video, (q,)
    frame_scores = torch.einsum("qr,vtr->qvt", own["query_keys"], keys).masked_fill(~mask[None], -torch.inf)
    logits = frame_scores.amax(dim=-1) / cfg.temperature  # (q, w b)
    # Not negatives: the query's video itself (another window of it), a video holding the sentence, padding.
    holds = (sentences[None] == rearrange(batch["query_hash"], "q -> q 1 1")).any(-1)
    same = video_hash[None] == rearrange(video_hash[target], "q -> q 1")
    excluded = (holds | same | ~mask.any(-1)[None]).scatter(1, target[:, None], False)
    logits = logits.masked_fill(excluded, -torch.inf)
    used = batch["query_mask"] & batch["relevance"].bool().any(-1) if "query_mask" in batch \
        else batch["relevance"].bool().any(-1)
    per_query = F.cross_entropy(logits, target, reduction="none")
    return torch.where(used, per_query, 0.0).sum() / used.sum().clamp(min=1)


def moment_level_loss(own: dict, negative: dict, batch: dict, relevance_loss: str,
                      focal_gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(every valid frame of a query's negative videos, and its hardest: relevance 0; presence, the best frame's
    presence logit: 1 in the query's own window when its moment is there, 0 in each negative video).
    Presence is a head of its own on detached inputs: the in-video ranking stays relevance's alone."""
    from vmr.model.losses import focal_loss, masked_mean

    logits = negative["relevance_logits"].float()
    zeros = torch.zeros_like(logits)
    per_frame = focal_loss(logits, zeros, focal_gamma) if relevance_loss == "focal" \
        else F.binary_cross_entropy_with_logits(logits, zeros, reduction="none")
    absent = masked_mean(per_frame, negative["frame_mask"])
    # And each negative video's hardest frame: every frame of a video without the event is a negative,
    # and a search ranks a video by its best one (often a near miss: the same object doing another thing,
    # a few frames that the mean over all of them hardly sees).
    hardest = logits.masked_fill(~negative["frame_mask"], -1e4).amax(dim=-1)
    absent = absent + F.binary_cross_entropy_with_logits(hardest, torch.zeros_like(hardest), reduction="sum") \
        / max(len(hardest), 1)
    # Finite fill values: an infinity would send NaN through the backward of rows left out.
    best_own = own["presence_logits"].float().masked_fill(~own["frame_mask"], -1e4).amax(dim=-1)
    best_negative = negative["presence_logits"].float().masked_fill(~negative["frame_mask"], -1e4).amax(dim=-1)
    used = batch["relevance"].bool().any(-1) & (batch["query_mask"] if "query_mask" in batch else True)
    present = F.binary_cross_entropy_with_logits(best_own, torch.ones_like(best_own), reduction="none")
    missing = F.binary_cross_entropy_with_logits(best_negative, torch.zeros_like(best_negative), reduction="none")
    presence = (torch.where(used, present, 0.0).sum() + missing.sum()) / (used.sum() + len(missing)).clamp(min=1)
    return absent, presence
