"""The image-text towers from transformers, behind one interface the layers above use: loading (hub
name, local directory, or random init from a config), image preprocessing on the device, and
encoders that keep every token.

Kinds (``model.backbone``):
  clip     CLIPModel: a class token, projections into the shared space, a causal text tower read at
           its end-of-text token.
  siglip   SiglipModel (SigLIP, and SigLIP 2's fixed-resolution checkpoints): no class token (the
           image embedding comes from an attention-pooling head), no projections (the shared space
           is the towers' width), a bidirectional text tower trained on text padded to its full
           length and read at the last position, pixels normalised to [-1, 1].
  siglip2  Siglip2Model (SigLIP 2's NaFlex checkpoints): as siglip, but the vision tower takes
           patches with their grid's shape (any resolution and aspect ratio).

The interface (``Towers``): ``encode_frames`` uint8 (n, 3, s, s) -> (n, 1+p, c) tokens, the pooled
frame embedding first, then the patch grid; ``encode_text`` ids (q, l) -> token features (q, l, ct)
and the sentence embedding (q, cs); ``vision_width``, ``text_width``, ``sentence_width``, ``grid``
(patches per frame), ``kind``, and ``vision`` (the module whose weights fingerprint a cache).

Shapes: n frames (any batch of images), p patches, q queries, l text tokens, c widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vmr.config import MAX_DEPTH, ModelConfig
from vmr.errors import UserError
from vmr.io import first_line


@dataclass(frozen=True)
class Kind:
    """What differs between the kinds outside the towers' code: transformers' class names, the pixel
    statistics a processor defaults to, and the text length random towers get."""

    model: str
    config: str
    processor: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    text_positions: int


# OpenAI CLIP's pixel statistics, SigLIP's [-1, 1]; a pretrained checkpoint's own processor overrides them.
KINDS = {
    "clip": Kind("CLIPModel", "CLIPConfig", "CLIPImageProcessorPil",
                 (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 77),
    "siglip": Kind("SiglipModel", "SiglipConfig", "SiglipImageProcessorPil", (0.5,) * 3, (0.5,) * 3, 64),
    "siglip2": Kind("Siglip2Model", "Siglip2Config", "Siglip2ImageProcessorPil", (0.5,) * 3, (0.5,) * 3, 64),
}


def _transformers(name: str):
    import transformers

    return getattr(transformers, name)


def tower_config(kind: str, values: dict, where: str = "tower_config.json"):
    """A towers config of ``kind`` from its JSON (a bundle's ``tower_config.json``), each value of
    the kind's own fields (and of its text and vision parts) checked against the type of its
    default: transformers takes a JSON as it is, and a bool where an id belongs fails only later,
    deep in a forward. Numbers must be finite, layers and heads at most 256, other integers below 2**24
    (a ValueError naming the key: its reader says which bundle)."""
    cls = _transformers(KINDS[kind].config)
    default = cls()
    _check_values(values, default, where)
    for part in ("text_config", "vision_config"):
        if part in values:
            if not isinstance(values[part], dict):
                raise ValueError(f"{where}: '{part}' must be an object")
            _check_values(values[part], getattr(default, part), f"{where}: {part}")
    return cls.from_dict(values)


def _check_values(values: dict, default, where: str) -> None:
    for key, value in values.items():
        expected = getattr(default, key, None)
        if expected is None or isinstance(expected, (dict, list)) or key.endswith("_config"):
            continue
        kinds = (int, float) if isinstance(expected, float) else (type(expected),)
        if (isinstance(value, bool) != isinstance(expected, bool)) or not isinstance(value, kinds):
            raise ValueError(f"{where}: '{key}' must be {type(expected).__name__}, got {value!r:.40}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            limit = MAX_DEPTH if key.endswith(("layers", "heads")) else 1 << 24 if isinstance(value, int) else math.inf
            if not math.isfinite(value) or value > limit:
                raise ValueError(f"{where}: '{key}' is {value!r:.40}, outside what a model can be built with")


def random_tower_config(cfg: ModelConfig, tokenizer):
    """A config of ``cfg.backbone``'s kind with the sizes in ``cfg``, whose vocabulary and special
    ids match ``tokenizer``."""
    kind = KINDS[cfg.backbone]
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=kind.text_positions, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(patch_size=cfg.patch_size, hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads)
    if cfg.backbone == "clip":
        return _transformers(kind.config)(text_config=text, vision_config={**vision, "image_size": cfg.image_size},
                                          projection_dim=cfg.projection_dim)
    text["projection_size"] = cfg.vision_width  # the sentence lands in the image embedding's space
    if cfg.backbone == "siglip":
        vision["image_size"] = cfg.image_size
    else:  # NaFlex: a budget of patches rather than an image size; a square frame fills it
        vision["num_patches"] = (cfg.image_size // cfg.patch_size) ** 2
    return _transformers(kind.config)(text_config=text, vision_config=vision)


def load_towers_model(cfg: ModelConfig, tokenizer, tower_config=None):
    """``tower_config`` given: build it (weights come later, e.g. from a bundle). Else
    ``cfg.init == "random"``: new towers of the configured sizes; else ``from_pretrained(cfg.name)``,
    which must be a checkpoint of ``cfg.backbone``'s kind."""
    cls = _transformers(KINDS[cfg.backbone].model)
    if tower_config is not None:
        return cls(tower_config)
    if cfg.init == "random":
        return cls(random_tower_config(cfg, tokenizer))
    try:
        found = _transformers("AutoConfig").from_pretrained(cfg.name).model_type
    except (OSError, ValueError) as error:
        raise UserError(f"model.name: cannot load {cfg.backbone} towers {cfg.name!r} ({first_line(error)})") from None
    if found != cfg.backbone:
        hint = f"set model.backbone: {found}" if found in KINDS else f"model.backbone is one of {', '.join(KINDS)}"
        raise UserError(f"model.name: {cfg.name!r} is a {found} checkpoint, but model.backbone is {cfg.backbone} ({hint})")
    try:
        return cls.from_pretrained(cfg.name)
    except (OSError, ValueError) as error:
        raise UserError(f"model.name: cannot load {cfg.backbone} towers {cfg.name!r} ({first_line(error)})") from None


def load_processor(cfg: ModelConfig, tower_config, source: str | None = None):
    """The image processor (pixel mean/std and input size): from ``source`` (a bundle or the
    pretrained checkpoint) when it has one, else the kind's defaults at the tower's input size.
    (The Pillow-based processors: same files and values, without the torchvision dependency.)"""
    kind = KINDS[cfg.backbone]
    cls = _transformers(kind.processor)
    if source is not None:
        try:
            return _checked_stats(cls.from_pretrained(source), source)
        except OSError:
            pass
    vision = tower_config.vision_config
    stats = dict(image_mean=list(kind.mean), image_std=list(kind.std))
    if cfg.backbone == "clip":
        size = vision.image_size
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **stats)
    if cfg.backbone == "siglip":
        return cls(size={"height": vision.image_size, "width": vision.image_size}, **stats)
    return cls(patch_size=vision.patch_size, max_num_patches=vision.num_patches, **stats)


def _checked_stats(processor, source: str):
    """A processor whose pixel mean and std are 3 finite numbers each, std above 0: anything else
    would turn every frame into NaN or infinity (and every score, every stored token with it)."""
    for key in ("image_mean", "image_std"):
        values = getattr(processor, key, None)
        ok = isinstance(values, (list, tuple)) and len(values) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok or (key == "image_std" and min(values) <= 0):
            raise UserError(f"{source}: its image processor's {key} must be 3 finite numbers"
                            f"{' above 0' if key == 'image_std' else ''}, got {values!r:.60}")
    return processor


def enable_checkpointing(towers_model) -> None:
    """Gradient (activation) checkpointing of the towers, non-reentrant. transformers 5.24 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and warns on the old
    name; 5.17 (the lowest supported) has only the old one."""
    if hasattr(towers_model, "activation_checkpointing_enable"):
        towers_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        towers_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Towers(nn.Module):
    """What every kind shares: pixels normalised on the device at the tower's input size, frames
    encoded in chunks, freezing and gradient checkpointing. Kinds define ``_frames`` (normalised
    pixels -> tokens) and ``encode_text``. Both return all tokens (patches and words), not only the
    pooled embeddings: the layers above attend to them."""

    kind = ""

    def __init__(self, towers_model, processor, cfg: ModelConfig, side: int):
        super().__init__()
        self.image_size, self.grid = side, (side // towers_model.config.vision_config.patch_size) ** 2
        self.frozen, self.chunk = cfg.freeze_backbone, cfg.frame_chunk
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)

    def _finish(self, towers_model, cfg: ModelConfig) -> None:
        """After a kind has taken its modules: freezing and checkpointing apply to all of them."""
        if cfg.freeze_backbone:
            self.requires_grad_(False)
        if cfg.gradient_checkpointing:
            enable_checkpointing(towers_model)

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, s, s) -> normalised floats at the tower's input size and dtype."""
        x = frames.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        # DeepSpeed bf16 keeps the weights in bf16 without autocast: inputs must match them.
        return x.to(self.vision.embeddings.patch_embedding.weight.dtype)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, s, s) -> (n, 1+p, c), chunked so that long batches fit in memory."""
        with self._grad():
            return torch.cat([self._frames(self.pixels(chunk)) for chunk in frames.split(self.chunk)])

    def _grad(self):
        """Frozen towers build no graph, even when the layers above train."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)


class ClipTowers(Towers):
    """CLIP's vision and text towers with their projections into the shared space."""

    kind = "clip"

    def __init__(self, clip, processor, cfg: ModelConfig):
        super().__init__(clip, processor, cfg, clip.config.vision_config.image_size)
        self.vision, self.text = clip.vision_model, clip.text_model
        self.visual_projection, self.text_projection = clip.visual_projection, clip.text_projection
        self.vision_width = self.text_width = self.sentence_width = clip.config.projection_dim
        self._finish(clip, cfg)

    def vision_parts(self) -> list[nn.Module]:
        return [self.vision, self.visual_projection]

    def text_parts(self) -> list[nn.Module]:
        return [self.text, self.text_projection]

    def _frames(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values=pixels).last_hidden_state  # (n, 1+p, w): class token first
        return self.visual_projection(self.vision.post_layernorm(hidden))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, l) ids -> token features (q, l, c) and the sentence embedding (q, c).

        The text tower is causal, so the sentence is read at the end-of-text token, the last real
        token of each row (token 0 would give the same vector for every sentence). For the same
        reason no padding mask is passed: padding comes after the real tokens, which never attend
        to later positions, so their features are the same without it (padded positions differ,
        and the layers above mask them). The causal mask alone lets attention take the fused
        (flash) kernel, which an explicit mask rules out."""
        with self._grad():
            tokens = self.text_projection(self.text(input_ids=ids).last_hidden_state)
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        sentence = tokens[torch.arange(len(tokens), device=tokens.device), last]
        return tokens, sentence


class SiglipTowers(Towers):
    """SigLIP's towers (SiglipModel). The vision tower's output is already normalised (its
    post-layernorm), and its pooling head gives the frame embedding that stands where CLIP's class
    token does; the text head projects the sentence only."""

    kind = "siglip"

    def __init__(self, siglip, processor, cfg: ModelConfig):
        super().__init__(siglip, processor, cfg, self.input_side(siglip.config.vision_config))
        self.vision, self.text = siglip.vision_model, siglip.text_model
        self.vision_width = siglip.config.vision_config.hidden_size
        self.text_width = siglip.config.text_config.hidden_size
        self.sentence_width = self.text.head.out_features
        self.text_length = siglip.config.text_config.max_position_embeddings
        self.pad_id = siglip.config.text_config.pad_token_id or 0
        self._finish(siglip, cfg)

    @staticmethod
    def input_side(vision_config) -> int:
        return vision_config.image_size

    def vision_parts(self) -> list[nn.Module]:
        return [self.vision]

    def text_parts(self) -> list[nn.Module]:
        return [self.text]

    def _vision(self, pixels: torch.Tensor):
        return self.vision(pixel_values=pixels)

    def _frames(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self._vision(pixels)
        patches = out.last_hidden_state  # (n, p, c)
        pooled = out.pooler_output if out.pooler_output is not None else patches.mean(dim=1)
        return torch.cat([rearrange(pooled, "n c -> n 1 c"), patches], dim=1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, l) ids -> token features (q, l, c) and the sentence embedding (q, cs).

        The tower was trained on text padded to its full length, without a padding mask, and reads
        the sentence at the last position. So the ids are padded to that length here, whatever the
        caller's padding: a sentence's features never depend on the other sentences of its batch.
        The layers above mask the padded positions (``mask``)."""
        q, length = ids.shape
        if length > self.text_length:
            raise ValueError(f"{length} text tokens, the text tower takes at most {self.text_length} (data.max_text_len)")
        full = ids.new_full((q, self.text_length), self.pad_id)
        full[:, :length] = torch.where(mask.bool(), ids, self.pad_id)
        with self._grad():
            out = self.text(input_ids=full)
        return out.last_hidden_state[:, :length], out.pooler_output


class Siglip2Towers(SiglipTowers):
    """SigLIP 2's NaFlex towers (Siglip2Model): the vision tower takes flattened patches with their
    grid's shape and resizes its position embeddings to it. vmr's frames are square, so they enter
    as the largest square grid within the tower's patch budget."""

    kind = "siglip2"

    @staticmethod
    def input_side(vision_config) -> int:
        return int(vision_config.num_patches ** 0.5) * vision_config.patch_size

    def _vision(self, pixels: torch.Tensor):
        p = self.vision.config.patch_size
        side = pixels.shape[-1] // p
        patches = rearrange(pixels, "n c (h p1) (w p2) -> n (h w) (p1 p2 c)", p1=p, p2=p)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=pixels.device)
        shapes = torch.tensor([[side, side]], device=pixels.device).expand(len(pixels), 2)
        return self.vision(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)


TOWERS = {"clip": ClipTowers, "siglip": SiglipTowers, "siglip2": Siglip2Towers}


def frames_to_tokens(towers: Towers, videos: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """(b, t, 3, s, s) -> (b, t, 1+p, c); padded frames come out as zeros, so they cannot change
    anything downstream.

    On a CPU only the valid frames go through the tower: padding costs nothing, and picking them
    costs no wait. On an accelerator, and in compiled code, every frame goes through and padding
    is zeroed by a multiplication: picking by the mask would give a shape only the device knows,
    which makes the host wait for it and allocate new sizes at every step (and makes compiled code
    recompile)."""
    flat_mask = rearrange(frame_mask, "b t -> (b t)")
    flat = rearrange(videos, "b t c h w -> (b t) c h w")
    if videos.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled code needs fixed shapes
        if not flat_mask.any():
            raise ValueError("a batch without any valid frame")
        encoded = towers.encode_frames(flat[flat_mask])
        tokens = encoded.new_zeros((len(flat_mask), *encoded.shape[1:]))
        tokens[flat_mask] = encoded
    else:
        tokens = towers.encode_frames(flat) * rearrange(flat_mask, "n -> n 1 1")
    return rearrange(tokens, "(b t) p c -> b t p c", b=frame_mask.shape[0])
