"""Typed configuration: dataclasses, YAML presets, ``section.key=value`` overrides.

Importable by anything. Unknown keys and values of the wrong type are UserErrors naming the key;
``load_config`` returns a validated ``Config`` and ``save_config`` writes the resolved one.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from vmr.errors import UserError
from vmr.io import first_line


@dataclass
class SamplingConfig:
    """The sampling spec: which frames of a video the model sees, the same in training, evaluation,
    prediction, the demo, the benchmarks and the feature cache. Applied by the data layer
    (``vmr/data/video.py``); saved with every inference bundle (its config.yaml) and read from there.
    A video longer than one window is seen as several windows at the same rate, never thinned."""

    fps: float = 1.0  # frames per second: one frame at the centre of (or, training, inside) each 1/fps bin
    window: int = 32  # frames the temporal layers see at once (window / fps seconds)
    size: int = 224  # frames are square crops of this side (shards are best built with --size equal to it)
    frames: Literal["uniform", "random", "keyframes"] = "random"  # training: where a frame sits in its bin
    negatives: float = 0.1  # training, videos longer than a window: share of windows placed at random
    overlap: float = 0.25  # inference: share of a window's frames also seen by the next window


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)  # paths, globs, brace patterns, pipe:/http URLs
    val_shards: list[str] = field(default_factory=list)
    allow_pipe: bool = False  # accept pipe:COMMAND shard URLs, which run COMMAND in a shell
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    queries_per_video: int = 4  # queries trained per video and step (evaluation uses all)
    max_text_len: int = 32
    num_workers: int = 2
    epoch_samples: int = 0  # videos per epoch; 0 = count them from the shards' manifest.json
    shuffle_buffer: int = 64  # videos
    seed: int = 0
    # Augmentation (training only)
    temporal_jitter: bool = True  # random offset of the uniform sampling grid
    temporal_crop: float = 0.5  # probability of a random crop that keeps the chosen queries' windows
    scale_jitter: tuple[float, float] = (0.7, 1.0)  # area fraction of a random square crop; (1, 1) = off
    hflip: bool = False  # flips frames and swaps "left"/"right" in the query; off: it changes the meaning


@dataclass
class CorpusConfig:
    """Training for a collection: scores that compare across videos (vmr/model/corpus.py)."""

    enabled: bool = False
    key_dim: int = 64  # width of the frame and query keys the collection index stores and asks
    negatives: int = 2  # other videos each query is run against (moment level); 0: video level only
    sentences: int = 0  # near-miss sentences (most words shared, not in the video) per query: relevance 0
    temperature: float = 0.05  # of the video-level contrast over key scores
    # loss_video, loss_presence train only the key and presence layers (detached inputs): small, so
    # that they do not dominate the global clipping norm (Adam's steps do not depend on the weight).
    loss_video: float = 0.05
    loss_presence: float = 0.05
    loss_negative: float = 1.0  # relevance 0 in the negative videos: it trains the layers


@dataclass
class DetrConfig:
    """The published DETR heads (model.head: moment_detr | qd_detr, vmr/model/heads/), with their
    reference implementations' defaults (jayleicn/moment_detr and wjun0830/QD-DETR, config.py)."""

    hidden_dim: int = 256  # QD-DETR's anchor embedding is fixed at 256
    nheads: int = 8
    enc_layers: int = 2
    dec_layers: int = 2
    dim_feedforward: int = 1024
    dropout: float = 0.1
    input_dropout: float = 0.5
    n_input_proj: int = 2  # layers of the video and text input projections (1-3)
    num_queries: int = 10  # moment slots per query
    use_txt_pos: bool = False
    max_q_l: int = 32  # text positions of the (unused unless use_txt_pos) text position embedding
    aux_loss: bool = True  # losses on every decoder layer
    tef: bool = True  # ctx_mode video_tef: each frame's [start, end) as a share of the window, appended
    normalize_video: bool = True  # L2 per frame (imported features were normalised per source at import)
    normalize_text: bool = True  # L2 per token
    # Matching costs and loss weights
    set_cost_span: float = 10.0
    set_cost_giou: float = 1.0
    set_cost_class: float = 4.0
    span_loss_coef: float = 10.0
    giou_loss_coef: float = 1.0
    label_loss_coef: float = 4.0
    eos_coef: float = 0.1  # the background class's weight in the label loss
    lw_saliency: float = 1.0
    saliency_margin: float = 0.2
    # Decoding (the references' inference): spans rounded to multiples of clip_length seconds
    # (0 = one frame interval, 1 / data.sampling.fps); nms_thd < 0: no NMS (their default)
    clip_length: float = 0.0
    nms_thd: float = -1.0


@dataclass
class ModelConfig:
    # The head on top of the towers (vmr/model/heads/): vmr's own, or a published one, numerically
    # identical to its reference code (Moment-DETR, QD-DETR; their settings in model.detr)
    head: Literal["vmr", "moment_detr", "qd_detr"] = "vmr"
    detr: DetrConfig = field(default_factory=DetrConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # vmr's head only (the others ignore it)
    # The image-text towers (vmr/model/backbone.py): clip (CLIPModel), siglip (SiglipModel, also SigLIP 2's
    # fixed-resolution checkpoints) or siglip2 (Siglip2Model, the NaFlex checkpoints)
    backbone: Literal["clip", "siglip", "siglip2"] = "clip"
    name: str = "openai/clip-vit-base-patch32"  # hub name or local directory (from_pretrained), of that kind
    init: Literal["pretrained", "random"] = "pretrained"  # random: towers of the sizes below, untrained
    tokenizer: str = ""  # "" = the model's; "synthetic" = built locally for `vmr synth` data
    # Tower sizes for init=random (pretrained towers bring their own; CLIP ViT-B/32's by default)
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    projection_dim: int = 512  # CLIP's shared space; SigLIP's is the vision width
    freeze_backbone: bool = False  # the towers get no gradient (freeze_clip: its earlier name)
    gradient_checkpointing: bool = False  # recompute the towers' activations in backward
    frame_chunk: int = 256  # frames per vision-tower call: bounds activation memory on long batches
    # Widths of imported features (vmr features) read instead of the towers'; 0 = the towers' own
    feature_dim: int = 0  # per-frame video features, e.g. 2816 for SlowFast + CLIP (2304 + 512)
    text_feature_dim: int = 0  # per-token query features, e.g. 512 for CLIP's text tower
    # Temporal and cross-attention layers on top of the towers (the head)
    temporal_modeling: bool = True  # self-attention over time; off: frames only see the query
    motion: bool = True  # the query reads each patch's change from/to the neighbouring frames too
    motion_span: int = 2  # with motion: changes over 1..motion_span frames on each side
    hidden_dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    # Losses
    relevance_loss: Literal["bce", "focal"] = "bce"
    focal_gamma: float = 2.0
    loss_relevance: float = 1.0
    loss_l1: float = 1.0
    loss_giou: float = 1.0
    loss_saliency: float = 1.0
    saliency_margin: float = 0.2
    # Decoding
    nms_iou: float = 0.7  # proposals overlapping a better one by more than this are dropped


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 0  # optimizer steps; 0 = run train.epochs epochs
    epochs: int = 1  # an epoch is every training video once (over all processes)
    batch_size: int = 8  # videos per process and micro-batch (each with up to data.queries_per_video queries)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    backbone_lr_mult: float = 0.1  # the towers' learning rate is lr times this
    weight_decay: float = 1e-5
    warmup_steps: int = 1000  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 (else fp16) on CUDA, fp16 on MPS, fp32 on CPU
    save_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the last K checkpoints are kept
    eval_every: int = 500  # steps between validations (and one at the end); needs data.val_shards
    eval_batch_size: int = 8
    # How validation scores (vmr/eval/metrics.py): the benchmark's own protocol
    eval_protocol: Literal["qvhighlights", "charades", "activitynet", "tacos", "tvsum",
                           "youtube_highlights"] = "qvhighlights"
    best_metric: str = "MR-full-R1@0.5"  # a key of that protocol's "brief" section; higher is better
    log_every: int = 10  # steps between TensorBoard scalars
    max_nonfinite_steps: int = 5  # non-finite losses in a row before the run stops
    # torch.compile of the model (inductor, fixed shapes): the first steps compile (minutes), later
    # ones reuse the code. Off by default: what it gains is a GPU measurement (vmr bench train --compile).
    compile: bool = False
    figure_queries: int = 4  # validation queries drawn in TensorBoard at each validation
    seed: int = 0


# Every size of the model that something divides by or allocates from.
POSITIVE_MODEL_SIZES = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                        "text_layers", "text_heads", "projection_dim", "hidden_dim", "num_heads")
NON_NEGATIVE_MODEL_VALUES = ("focal_gamma", "loss_relevance", "loss_l1", "loss_giou", "loss_saliency",
                             "saliency_margin", "feature_dim", "text_feature_dim", "num_layers")
MAX_FPS = 60.0  # frames per second the model may sample; a video's own rate bounds it further when read
MAX_WINDOW = 4096  # frames per window
# Architecture sizes are bounded, so that a config (a bundle's, too) can never ask for a model that
# takes forever or all memory to build: layers and heads up to 256, every other size up to 65536.
MAX_DEPTH, MAX_SIZE = 256, 65536


def _size_limits(section, prefix: str):
    """(ok, key, why) for every integer field of a model section against its bound."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            limit = MAX_DEPTH if f.name.endswith(("layers", "heads")) else MAX_SIZE
            yield value <= limit, f"{prefix}{f.name}", f"must be at most {limit}"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        d, m, t = self.data, self.model, self.train
        checks = [
            (d.sampling.fps > 0, "data.sampling.fps", "must be positive"),
            (d.sampling.window >= 1, "data.sampling.window", "must be at least 1"),
            (d.sampling.size >= 8, "data.sampling.size", "must be at least 8"),
            (0 <= d.sampling.negatives <= 1, "data.sampling.negatives", "is a share in [0, 1]"),
            (0 <= d.sampling.overlap < 1, "data.sampling.overlap", "is a share in [0, 1)"),
            (d.queries_per_video >= 1, "data.queries_per_video", "must be at least 1"),
            (d.max_text_len >= 4, "data.max_text_len", "must be at least 4"),
            (d.num_workers >= 0, "data.num_workers", "must be >= 0"),
            (d.epoch_samples >= 0, "data.epoch_samples", "must be >= 0"),
            (d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be at least 1"),
            (0 <= d.temporal_crop <= 1, "data.temporal_crop", "is a probability in [0, 1]"),
            (0 < d.scale_jitter[0] <= d.scale_jitter[1] <= 1, "data.scale_jitter", "needs 0 < min <= max <= 1"),
            # Sizes first: the multiples below divide by them.
            *((getattr(m, k) >= 1, f"model.{k}", "must be at least 1") for k in POSITIVE_MODEL_SIZES),
            (m.patch_size <= m.image_size, "model.patch_size", "must be at most model.image_size"),
            (d.sampling.window <= MAX_WINDOW, "data.sampling.window", f"must be at most {MAX_WINDOW} frames"),
            (d.sampling.fps <= MAX_FPS, "data.sampling.fps", f"must be at most {MAX_FPS:g} frames/s"),
            (d.sampling.size <= 1024, "data.sampling.size", "must be at most 1024 pixels"),
            (d.max_text_len <= 512, "data.max_text_len", "must be at most 512 tokens"),
            *((getattr(m, k) >= 0, f"model.{k}", "must be >= 0") for k in NON_NEGATIVE_MODEL_VALUES),
            *_size_limits(m, "model."), *_size_limits(m.detr, "model.detr."), *_size_limits(m.corpus, "model.corpus."),
            (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "is a share in [0, 1]"),
            (t.max_grad_norm >= 0 and t.weight_decay >= 0 and t.backbone_lr_mult >= 0, "train.max_grad_norm",
             "and train.weight_decay, train.backbone_lr_mult must be >= 0"),
            (t.figure_queries >= 0, "train.figure_queries", "must be >= 0"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise UserError(f"{key} {why}, got {_get(self, key)!r}")
        # Only now that every size is at least 1:
        checks = [
            (m.image_size % m.patch_size == 0, "model.image_size", "must be a multiple of model.patch_size"),
            (m.hidden_dim % m.num_heads == 0, "model.hidden_dim", "must be a multiple of model.num_heads"),
            (m.vision_width % m.vision_heads == 0, "model.vision_width", "must be a multiple of vision_heads"),
            (m.text_width % m.text_heads == 0, "model.text_width", "must be a multiple of text_heads"),
            (m.motion_span >= 1, "model.motion_span", "must be at least 1"),
            (m.frame_chunk >= 1, "model.frame_chunk", "must be at least 1"),
            (0 <= m.dropout < 1, "model.dropout", "must be in [0, 1)"),
            (0 <= m.nms_iou <= 1, "model.nms_iou", "must be in [0, 1]"),
            *((getattr(m.detr, k) >= 1, f"model.detr.{k}", "must be at least 1")
              for k in ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                        "max_q_l")),
            (m.corpus.key_dim >= 1 and m.corpus.temperature > 0 and min(m.corpus.negatives, m.corpus.sentences,
                m.corpus.loss_video, m.corpus.loss_negative, m.corpus.loss_presence) >= 0, "model.corpus",
             "key_dim must be >= 1, temperature > 0, negatives, sentences and loss weights >= 0"),
            (not (m.corpus.sentences and m.text_feature_dim), "model.corpus.sentences", "needs the text tower "
             "(with imported query features, model.text_feature_dim, no other sentence can be read)"),
            (1 <= m.detr.n_input_proj <= 3, "model.detr.n_input_proj", "must be 1, 2 or 3"),
            (m.detr.hidden_dim % m.detr.nheads == 0, "model.detr.hidden_dim", "must be a multiple of model.detr.nheads"),
            (m.head != "qd_detr" or m.detr.hidden_dim == 256, "model.detr.hidden_dim",
             "must be 256 with model.head qd_detr (its anchor embedding is 2 x 128 wide)"),
            (0 <= m.detr.dropout < 1 and 0 <= m.detr.input_dropout < 1, "model.detr.dropout",
             "and model.detr.input_dropout must be in [0, 1)"),
            (min(m.detr.set_cost_span, m.detr.set_cost_giou, m.detr.set_cost_class, m.detr.span_loss_coef,
                 m.detr.giou_loss_coef, m.detr.label_loss_coef, m.detr.eos_coef, m.detr.lw_saliency,
                 m.detr.saliency_margin, m.detr.clip_length) >= 0, "model.detr",
             "costs, loss weights, saliency_margin and clip_length must be >= 0"),
            (t.max_steps >= 0, "train.max_steps", "must be >= 0"),
            (t.epochs >= 1, "train.epochs", "must be at least 1"),
            (t.batch_size >= 1, "train.batch_size", "must be at least 1"),
            (t.grad_accum >= 1, "train.grad_accum", "must be at least 1"),
            (t.lr > 0, "train.lr", "must be positive"),
            (t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
            (t.save_every >= 0, "train.save_every", "must be >= 0"),
            (t.eval_every >= 0, "train.eval_every", "must be >= 0"),
            (t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1"),
            (t.log_every >= 1, "train.log_every", "must be at least 1"),
            (t.eval_batch_size >= 1, "train.eval_batch_size", "must be at least 1"),
            (t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be at least 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise UserError(f"{key} {why}, got {_get(self, key)!r}")
        return self


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _coerce(value, kind, key: str):
    """Check (and gently convert: int -> float, "x" -> ["x"]) a value against a type hint."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means infinity or NaN (1e400 reads as inf): it would only train a broken model.
            if not math.isfinite(number):
                raise UserError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value in args and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    elif origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], key) for v in value]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    elif origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
    name = getattr(kind, "__name__", str(kind))
    raise UserError(f"{key}: expected {name}, got {value!r}")


# Keys of earlier versions, still read (bundles and presets written before the sampling spec).
RENAMED = {("data", "clip_fps"): ("data", "sampling", "fps"), ("data", "image_size"): ("data", "sampling", "size"),
           ("data", "frame_sampling"): ("data", "sampling", "frames"),
           ("model", "max_frames"): ("data", "sampling", "window"), ("model", "freeze_clip"): ("model", "freeze_backbone")}


def _renamed(values: dict) -> dict:
    """``values`` (a whole config mapping) with the keys of earlier versions moved to their new place
    (a value given under the new key wins)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for (section, key), (*parents, new_key) in RENAMED.items():
        if isinstance(values.get(section), dict) and key in values[section]:
            value = values[section].pop(key)
            target = values
            for part in parents:
                if not isinstance(target.get(part, {}), dict):
                    break  # a section given as something else: the reader refuses it later
                target[part] = dict(target.get(part) or {})
                target = target[part]
            else:
                target.setdefault(new_key, value)
    return values


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise UserError(f"unknown config key {key!r} (known: {known})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{key}: expected a section (mapping), got {value!r}")
            _apply(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[list[str], object]:
    """``section.key=value`` with the value read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


PRESETS = Path(__file__).parent / "configs"  # shipped inside the package; configs/ in the repository


def presets() -> list[str]:
    """The names of the presets that come with vmr (tiny, small, default, qvhighlights, ...)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset(name: str | Path) -> Path:
    """A config file: ``name`` itself when it exists, else the shipped preset it names (``tiny``,
    ``tiny.yaml`` or ``configs/tiny.yaml``), so that presets work from any directory and from an
    installed package."""
    path = Path(name)
    if path.exists():  # a folder or an unreadable file is the reader's to refuse, with its reason
        return path
    shipped = PRESETS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent in (Path(), Path("configs")) and shipped.is_file():
        return shipped
    raise UserError(f"{path}: config file not found (presets that come with vmr: {', '.join(presets())})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset YAML (a file, or a shipped preset's name: ``preset``) or the defaults, plus
    overrides, type-checked and validated."""
    cfg = Config()
    if path is not None:
        from vmr.io import read_text

        path = preset(path)
        try:
            values = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{path}: not valid YAML ({first_line(error)})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: a config file must be a mapping of sections")
        _apply(cfg, _renamed(values))
    for text in overrides:
        keys, value = parse_override(text)
        nested: object = value
        for part in reversed(keys):
            nested = {part: nested}
        _apply(cfg, _renamed(nested))
    return cfg.validate()


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    path.write_text(yaml.safe_dump(plain(config_to_dict(cfg)), sort_keys=False))
