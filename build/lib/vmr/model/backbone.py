"""The CLIP towers from transformers: loading (hub name, local directory, or random init from a
config), image preprocessing on the device, and encoders that keep every token.

Shapes: n frames (any batch of images), p patches (+1 for the class token), q queries,
l text tokens, c CLIP's projection width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vmr.config import ModelConfig
from vmr.errors import UserError
from vmr.io import first_line

# OpenAI CLIP's pixel statistics; a pretrained checkpoint's own processor overrides them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_clip_config(cfg: ModelConfig, tokenizer):
    """A CLIPConfig of the sizes in ``cfg`` whose vocabulary and special ids match ``tokenizer``."""
    from transformers import CLIPConfig

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.text_width,
                         intermediate_size=4 * cfg.text_width, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_heads, max_position_embeddings=77, **special),
        vision_config=dict(image_size=cfg.image_size, patch_size=cfg.patch_size,
                           hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads),
        projection_dim=cfg.projection_dim,
    )


def load_clip(cfg: ModelConfig, tokenizer, clip_config=None):
    """``clip_config`` given: build it (weights come later, e.g. from a bundle). Else
    ``cfg.init == "random"``: a new CLIP of the configured sizes; else ``from_pretrained(cfg.name)``."""
    from transformers import CLIPModel

    if clip_config is not None:
        return CLIPModel(clip_config)
    if cfg.init == "random":
        return CLIPModel(random_clip_config(cfg, tokenizer))
    try:
        return CLIPModel.from_pretrained(cfg.name)
    except (OSError, ValueError) as error:
        raise UserError(f"model.name: cannot load CLIP {cfg.name!r} ({first_line(error)})") from None


def load_processor(cfg: ModelConfig, clip_config, source: str | None = None):
    """The image processor (pixel mean/std and input size): from ``source`` (a bundle or the
    pretrained checkpoint) when it has one, else CLIP's defaults at the tower's input size."""
    # The Pillow-based processor: same files and values, without the torchvision dependency.
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor

    if source is not None:
        try:
            return CLIPImageProcessor.from_pretrained(source)
        except OSError:
            pass
    size = clip_config.vision_config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def enable_checkpointing(clip) -> None:
    """Gradient (activation) checkpointing of the CLIP towers, non-reentrant. transformers 5.24
    renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and warns on
    the old name; 5.17 (the lowest supported) has only the old one."""
    if hasattr(clip, "activation_checkpointing_enable"):
        clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class ClipTowers(nn.Module):
    """CLIP's vision and text towers with their projections into the shared space. Both return
    all tokens (patches and words), not only the pooled embedding: the layers above attend to them."""

    def __init__(self, clip, processor, cfg: ModelConfig):
        super().__init__()
        self.vision, self.text = clip.vision_model, clip.text_model
        self.visual_projection, self.text_projection = clip.visual_projection, clip.text_projection
        self.image_size = clip.config.vision_config.image_size
        self.width = clip.config.projection_dim
        self.frozen, self.chunk = cfg.freeze_clip, cfg.frame_chunk
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        if cfg.freeze_clip:
            self.requires_grad_(False)
        if cfg.gradient_checkpointing:
            enable_checkpointing(clip)

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, s, s) -> normalised floats at the tower's input size and dtype."""
        x = frames.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        # DeepSpeed bf16 keeps the weights in bf16 without autocast: inputs must match them.
        return x.to(self.visual_projection.weight.dtype)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, s, s) -> (n, 1+p, c), chunked so that long batches fit in memory."""
        outs = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for chunk in frames.split(self.chunk):
                hidden = self.vision(pixel_values=self.pixels(chunk)).last_hidden_state
                outs.append(self.visual_projection(self.vision.post_layernorm(hidden)))
        return torch.cat(outs)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, l) ids -> token features (q, l, c) and the sentence embedding (q, c).

        The text tower is causal, so the sentence is read at the end-of-text token, the last real
        token of each row (token 0 would give the same vector for every sentence). For the same
        reason no padding mask is passed: padding comes after the real tokens, which never attend
        to later positions, so their features are the same without it (padded positions differ,
        and the layers above mask them). The causal mask alone lets attention take the fused
        (flash) kernel, which an explicit mask rules out."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens = self.text_projection(self.text(input_ids=ids).last_hidden_state)
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        sentence = tokens[torch.arange(len(tokens), device=tokens.device), last]
        return tokens, sentence


def frames_to_tokens(towers: ClipTowers, videos: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
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
