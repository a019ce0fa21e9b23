"""VideoMomentRetrievalModel: image-text towers (CLIP or SigLIP, vmr/model/backbone.py), or a feature
cache in their place -> the head chosen by ``model.head`` (vmr/model/heads/: vmr's own, Moment-DETR,
QD-DETR, which decode their outputs); windows over whole videos. Its inference bundles are written
and read by vmr/bundle.py.

Legend: b videos, t frames, p patches per frame, q queries, l text tokens, c the towers' width,
d model width. A batch may hold several queries per video: each video is encoded once and
its features are copied to its queries by ``video_index`` (q,).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vmr.config import Config, ModelConfig, SamplingConfig
from vmr.model.backbone import TOWERS, frames_to_tokens, load_processor, load_towers_model
from vmr.model.heads import FRAME_KEYS, HEADS, decode_moments, decoding_nms, rank_moments
from vmr.spans import windows_over
from vmr.text import load_tokenizer


class VideoMomentRetrievalModel(nn.Module):
    """``VideoMomentRetrievalModel(model_name=..., temporal_modeling=True, freeze_backbone=False,
    **model_config_fields)``, or ``from_config(cfg.model, sampling=cfg.data.sampling)``, or
    ``vmr.bundle.read_bundle(bundle_dir)``. ``sampling`` is the spec the model is trained at (frames per
    second, frames per window): ``retrieve_moments`` and ``score_windows`` read videos with it, and
    bundles carry it."""

    def __init__(self, model_name: str | None = None, temporal_modeling: bool = True,
                 freeze_backbone: bool = False, *, config: ModelConfig | None = None, tokenizer=None,
                 tower_config=None, processor_source: str | None = None, sampling: SamplingConfig | None = None,
                 **options):
        super().__init__()
        if isinstance(tokenizer, str):  # the config field (a name), not a tokenizer object
            options["tokenizer"], tokenizer = tokenizer, None
        if config is None:
            freeze_backbone = options.pop("freeze_clip", freeze_backbone)  # its earlier name
            config = ModelConfig(temporal_modeling=temporal_modeling, freeze_backbone=freeze_backbone, **options)
            if model_name is not None:
                config.name = model_name
            Config(model=config).validate()
        self.config = config
        self.sampling = dataclasses.replace(sampling) if sampling is not None else SamplingConfig()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer or config.name)
        self.tokenizer.padding_side = "right"  # the text towers read real tokens first (encode_text)
        towers = load_towers_model(config, self.tokenizer, tower_config)
        if processor_source is None and tower_config is None and config.init == "pretrained":
            processor_source = config.name
        self.processor = load_processor(config, towers.config, processor_source)
        self.tower_config = towers.config
        # Sentences longer than the text tower's positions are cut (the loader's data.max_text_len too).
        self.tokenizer.model_max_length = towers.config.text_config.max_position_embeddings
        self.towers = TOWERS[config.backbone](towers, self.processor, config)

        cv = config.feature_dim or self.towers.vision_width
        ct, cs = (config.text_feature_dim,) * 2 if config.text_feature_dim else \
            (self.towers.text_width, self.towers.sentence_width)
        self.features: dict | None = None  # the feature cache trained on (vmr features), saved in bundles
        # The head, built after the towers (the random-init order of earlier bundles is unchanged).
        if config.head == "vmr":
            self.head = HEADS["vmr"](config, cv, ct, cs)
        else:
            self.head = HEADS[config.head](config.detr, cv, ct)

    @classmethod
    def from_config(cls, cfg: ModelConfig, **kwargs) -> VideoMomentRetrievalModel:
        return cls(config=cfg, **kwargs)

    # ----- forward ------------------------------------------------------------------------------

    def forward(self, video_frames: torch.Tensor, text_inputs: dict, frame_mask: torch.Tensor | None = None,
                video_index: torch.Tensor | None = None, frame_times: torch.Tensor | None = None,
                duration: torch.Tensor | None = None, negatives: torch.Tensor | None = None,
                prepared: dict | None = None) -> dict[str, torch.Tensor]:
        """Per-clip outputs for every query.

        video_frames uint8 (b, t, 3, s, s), or float (b, t, k, c) tokens from a feature cache (k = 1 +
        patches: the frame's pooled embedding then the patch grid; or k = 1, pooled only, which the
        query then pools as its only slot); text_inputs {"input_ids", "attention_mask"} (q, l), or
        {"features" (q, l, c), "attention_mask"} from imported text features (the sentence is the
        last valid token);
        frame_mask (b, t) False on padding; video_index (q,) the video of each query (default: one
        query per video, or every query on a single video); frame_times (b, t) seconds (default one
        frame per second) and duration (b,) seconds, carried through for losses and decoding.

        ``prepared``: what vmr's head made of the videos' tokens before any sentence (``head.prepare``,
        stored by a collection index), in place of ``video_frames`` (then None).

        Returns the head's outputs (vmr/model/heads/) and each query's ``frame_mask``,
        ``frame_times`` and ``duration``. Values at padded frames mean nothing.
        """
        b, t = (video_frames if prepared is None else prepared["frames"]).shape[:2]
        device = (video_frames if prepared is None else prepared["frames"]).device
        word_mask = text_inputs["attention_mask"].bool()
        # Text rows after the first len(video_index) are sentences only ``negatives`` pairs read (model.corpus).
        q = len(word_mask) if video_index is None else len(video_index)
        if frame_mask is None:
            frame_mask = torch.ones(b, t, dtype=torch.bool, device=device)
        if frame_times is None:
            frame_times = torch.arange(t, device=device, dtype=torch.float).expand(b, t)
        if duration is None:
            duration = frame_mask.sum(dim=1).float()
        if video_index is None:
            if b not in (1, q):
                raise ValueError(f"{q} queries for {b} videos: pass video_index")
            video_index = torch.arange(q, device=device) if b == q else torch.zeros(q, dtype=torch.long, device=device)

        if prepared is not None:
            tokens = None
        elif video_frames.is_floating_point():  # cached tokens: the vision tower ran once, at extraction
            tokens = video_frames  # each head casts them to what it computes in
        else:
            tokens = frames_to_tokens(self.towers, video_frames, frame_mask)  # (b, t, 1+p, c)
        if "features" in text_inputs:
            words = text_inputs["features"]
            last = word_mask.long().sum(dim=1).clamp(min=1) - 1
            sentence = words[torch.arange(len(words), device=device), last]
        else:
            words, sentence = self.towers.encode_text(text_inputs["input_ids"], word_mask)  # (q, l, c), (q, c)
        if negatives is not None and len(negatives):  # the text tower ran once per query, not per pair
            rows = torch.cat([torch.arange(q, device=device), negatives[:, 0]])
            words, sentence, word_mask = words[rows], sentence[rows], word_mask[rows]
            video_index = torch.cat([video_index, negatives[:, 1]])
        # At this point every video has its tokens and every query its words: the head does the rest.
        outputs = self.head(tokens, words, sentence, frame_mask, word_mask, video_index,
                            **({} if prepared is None else {"prepared": prepared}))
        outputs.update(frame_mask=frame_mask[video_index], frame_times=frame_times[video_index],
                       duration=duration[video_index])
        return outputs

    # ----- decoding -----------------------------------------------------------------------------

    def decode(self, outputs: dict, top_k: int = 5, nms_iou: float | None = None) -> list[dict]:
        return decode_moments(outputs, top_k, self.nms_iou if nms_iou is None else nms_iou, self.config)

    @property
    def nms_iou(self) -> float:
        return decoding_nms(self.config)

    def tokenize(self, queries: list[str], max_length: int = 77) -> dict:
        limit = min(max_length, self.tower_config.text_config.max_position_embeddings)
        enc = self.tokenizer(queries, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_queries(self, queries: list[str]) -> tuple[dict, torch.Tensor]:
        """The text tower on ``queries``, on the model's device: ``{"features" (q, l, c),
        "attention_mask" (q, l)}`` (what forward takes in place of ids, to run the tower once for
        many forwards) and the sentence embeddings (q, c)."""
        device = next(self.parameters()).device
        text = {k: v.to(device) for k, v in self.tokenize(queries).items()}
        words, sentence = self.towers.encode_text(text["input_ids"], text["attention_mask"].bool())
        return {"features": words, "attention_mask": text["attention_mask"]}, sentence

    @torch.no_grad()
    def score_windows(self, windows, queries: list[str], duration: float) -> list[dict]:
        """Whole-video scores of several queries, one window of frames at a time (memory bounded by a
        window, whatever the video's length). ``windows`` yields ``(frames uint8 (t, 3, h, w), times
        (t,) seconds from the video's start, start, end, own)``: the window spans [start, end) seconds
        and reports its frames ``own[0]:own[1]``. Returns per query the ``frame_outputs`` of the whole
        video (``rank_moments`` turns them into moments)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        text = self.encode_queries(queries)[0]  # the text tower once for every window
        merged = [{key: [] for key in FRAME_KEYS} for _ in queries]
        for frames, times, start, end, own in windows:
            local = torch.as_tensor(times, dtype=torch.float)[None] - start
            outputs = self(frames[None].to(device), text, frame_times=local.to(device),
                           duration=torch.tensor([end - start], device=device),
                           video_index=torch.zeros(len(queries), dtype=torch.long, device=device))
            n = len(queries)
            for row, part in zip(merged, self.head.frame_outputs(outputs, torch.tensor([own] * n), torch.full((n,), start),
                                                                 torch.full((n,), duration)), strict=True):
                for key in FRAME_KEYS:
                    row[key] += part[key]
        self.train(was_training)
        return merged

    @torch.no_grad()
    def retrieve_moments(self, frames: torch.Tensor, query: str, top_k: int = 5,
                         frame_times: list[float] | torch.Tensor | None = None,
                         duration: float | None = None, nms_iou: float | None = None):
        """Ranked moments for one query on one video, every frame scored.

        ``frames`` uint8 (t, 3, h, w) of the whole video, sampled at ``self.sampling.fps`` (the rate
        the model was trained at); ``frame_times`` in seconds default to the centres of 1/fps bins;
        ``duration`` defaults to one frame interval past the last frame. Videos longer than
        ``self.sampling.window`` frames are scored in overlapping windows of that many frames.
        Returns ``([{"start", "end", "score"}, ...], frame_scores)`` with one relevance probability
        per frame."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (t, 3, h, w), got {tuple(frames.shape)}")
        if not query.strip():
            raise ValueError("the query is empty")
        fps = self.sampling.fps
        times = (torch.arange(len(frames), dtype=torch.float64) + 0.5) / fps if frame_times is None else \
            torch.as_tensor(frame_times, dtype=torch.float64).cpu()
        if len(times) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(times)} frame times")
        if duration is None:
            step = float(times[1:].sub(times[:-1]).median()) if len(times) > 1 else 1.0 / fps
            duration = float(times[-1]) + (step / 2 if frame_times is None else step)
        windows = ((frames[first:end], times[first:end].tolist(), start, stop, own)
                   for first, end, own, start, stop in windows_over(times.tolist(), duration, self.sampling.window,
                                                                    self.sampling.overlap))
        scores = self.score_windows(windows, [query], duration)[0]
        moments = rank_moments(scores, top_k, self.nms_iou if nms_iou is None else nms_iou)
        return [{"start": s, "end": e, "score": p} for s, e, p in moments], scores["relevance"]

    # ----- optimisation -------------------------------------------------------------------------

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups: the towers at ``lr * backbone_lr_mult``, the rest at ``lr``; no weight decay on
        biases, norms and embeddings (tensors with fewer than 2 dimensions), except in a published
        head, whose reference decays every parameter."""
        backbone = {id(p) for p in self.towers.parameters()}
        every = self.config.head != "vmr"  # the published heads' optimizer decays every parameter
        groups: dict[tuple[bool, bool], list] = {}
        for p in self.parameters():
            if p.requires_grad:
                is_backbone = id(p) in backbone
                groups.setdefault((is_backbone, p.ndim >= 2 or (every and not is_backbone)), []).append(p)
        return [{"params": params, "lr": lr * (backbone_lr_mult if is_backbone else 1.0),
                 "weight_decay": weight_decay if decays else 0.0,
                 "name": f"{'backbone' if is_backbone else 'head'}{'' if decays else '_no_decay'}"}
                for (is_backbone, decays), params in sorted(groups.items())]


def batch_forward(model, batch: dict) -> dict[str, torch.Tensor]:
    """THE way a loader batch (vmr/data/stream.py) is fed to the model, in training, evaluation and
    the benchmarks. ``model`` may be wrapped (DDP, DeepSpeed): its forward is called."""
    text = {"attention_mask": batch["text_mask"]}
    if "text_features" in batch:
        text["features"] = batch["text_features"]
    else:
        text["input_ids"] = batch["text_ids"]
    return model(batch["videos"], text, frame_mask=batch["frame_mask"], video_index=batch["video_index"],
                 frame_times=batch["frame_times"], duration=batch["duration"], negatives=batch.get("negatives"))
