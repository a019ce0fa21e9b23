"""``vmr convert``: a Moment-DETR or QD-DETR checkpoint, as their repositories save and release it
(``torch.save({"model": state_dict, "opt": argparse.Namespace, ...})``), -> a vmr inference bundle
with the same settings, for ``vmr eval`` / ``vmr predict`` on features brought in by ``vmr features
import``.

The file is read with ``torch.load(weights_only=True)``: tensors, containers, numbers and strings,
plus the two types such files hold (``argparse.Namespace``, ``torch.device``); nothing in it runs.
Anything else (another pickled class, a missing or misshapen weight, a setting vmr's head cannot
honour) is refused in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from vmr.bundle import write_bundle
from vmr.errors import UserError
from vmr.io import first_line

# Settings of the references' opt that map onto model.detr (same names, same meaning).
DETR_FIELDS = ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "dropout", "input_dropout",
               "n_input_proj", "num_queries", "use_txt_pos", "max_q_l", "aux_loss", "set_cost_span", "set_cost_giou",
               "set_cost_class", "span_loss_coef", "giou_loss_coef", "label_loss_coef", "eos_coef", "lw_saliency",
               "saliency_margin", "clip_length", "nms_thd")
BASE_PRESET = "qvhighlights_features"  # tiny stand-in towers, 2-s clips, 75-clip windows


def read_checkpoint(path: Path) -> tuple[dict, argparse.Namespace]:
    """The ``model`` state dict and ``opt`` of a reference checkpoint, read without running code."""
    import pickle

    import torch

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, torch.device]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path}: refused, it holds more than weights and settings "
                        f"({first_line(error, 140)}); nothing in it was run") from None
    except Exception as error:  # truncated, not a torch file, a zip of something else
        raise UserError(f"{path}: not readable as a torch checkpoint ({first_line(error, 140)})") from None
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict) \
            or not isinstance(content.get("opt"), argparse.Namespace):
        raise UserError(f"{path}: not a Moment-DETR / QD-DETR checkpoint (expected a dict with 'model', a state "
                        "dict, and 'opt', the run's settings)")
    state = content["model"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise UserError(f"{path}: its 'model' holds {bad[0]!r}, which is not a named tensor")
    return state, content["opt"]


def head_of(state: dict, path: Path) -> str:
    if "global_rep_token" in state:
        return "qd_detr"
    if "saliency_proj.weight" in state:
        return "moment_detr"
    raise UserError(f"{path}: its weights are neither Moment-DETR's (saliency_proj) nor QD-DETR's (global_rep_token)")


def settings(opt: argparse.Namespace, head: str, path: Path):
    """The bundle's Config from the checkpoint's ``opt``."""
    from vmr.config import load_config

    def need(name, kinds):
        value = getattr(opt, name, None)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise UserError(f"{path}: its opt.{name} is {value!r}, expected {' or '.join(k.__name__ for k in kinds)}")
        return value

    if getattr(opt, "span_loss_type", "l1") != "l1":
        raise UserError(f"{path}: opt.span_loss_type {opt.span_loss_type!r}: only 'l1' (centre/width regression) is supported")
    if getattr(opt, "contrastive_align_loss", False):
        raise UserError(f"{path}: opt.contrastive_align_loss is on: that variant is not supported")
    if getattr(opt, "a_feat_dir", None):
        raise UserError(f"{path}: trained with audio features (opt.a_feat_dir): not supported")
    ctx_mode = need("ctx_mode", (str,))
    if "video" not in ctx_mode:
        raise UserError(f"{path}: opt.ctx_mode {ctx_mode!r} reads no video features: not supported")
    tef = "tef" in ctx_mode
    v_dim, t_dim = need("v_feat_dim", (int,)), need("t_feat_dim", (int,))
    cfg = load_config(BASE_PRESET)
    detr = {}
    for name in DETR_FIELDS:
        if hasattr(opt, name):
            kind = type(getattr(cfg.model.detr, name))
            value = need(name, (kind,) if kind is not float else (int, float))
            detr[name] = float(value) if kind is float else value
    clip = detr.get("clip_length", 2.0) or 2.0
    cfg.model = dataclasses.replace(
        cfg.model, head=head, feature_dim=v_dim - (2 if tef else 0), text_feature_dim=t_dim,
        detr=dataclasses.replace(cfg.model.detr, **detr, tef=tef,
                                 # vmr features import L2-normalises each source before concatenating
                                 # them, as the references' loaders do when no_norm_vfeat is off.
                                 normalize_video=False, normalize_text=not getattr(opt, "no_norm_tfeat", False)))
    cfg.data.sampling = dataclasses.replace(cfg.data.sampling, fps=1.0 / clip,
                                            window=int(getattr(opt, "max_v_l", cfg.data.sampling.window)))
    if getattr(opt, "no_norm_vfeat", False):
        raise UserError(f"{path}: opt.no_norm_vfeat is set, but vmr features import always L2-normalises video features")
    # The run's optimisation settings, kept for fine-tuning from the bundle.
    cfg.train = dataclasses.replace(cfg.train, lr=float(getattr(opt, "lr", cfg.train.lr)),
                                    weight_decay=float(getattr(opt, "wd", cfg.train.weight_decay)),
                                    max_grad_norm=float(getattr(opt, "grad_clip", cfg.train.max_grad_norm)))
    return cfg.validate()


def convert(path: Path, out: Path, overwrite: bool = False) -> Path:
    from vmr.model import VideoMomentRetrievalModel

    if out.exists() and not overwrite:
        raise UserError(f"--out: {out} already exists (pass --overwrite to replace it)")
    state, opt = read_checkpoint(path)
    head = head_of(state, path)
    cfg = settings(opt, head, path)
    model = VideoMomentRetrievalModel(config=cfg.model, sampling=cfg.data.sampling)
    own = model.head.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise UserError(f"{path}: its weights do not fit a {head} head of its settings ({len(missing)} missing, e.g. "
                        f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    wrong = [k for k in sorted(own) if own[k].shape != state[k].shape]
    if wrong:
        raise UserError(f"{path}: {wrong[0]} is {tuple(state[wrong[0]].shape)}, its settings make it "
                        f"{tuple(own[wrong[0]].shape)}")
    model.head.load_state_dict({k: v.float() for k, v in state.items()})
    return write_bundle(model, out, cfg)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a Moment-DETR or QD-DETR checkpoint file as released (e.g. model_best.ckpt)")
    p.add_argument("--out", type=Path, required=True, help="the inference bundle to write (a folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    bundle = convert(args.checkpoint, args.out, args.overwrite)
    print(f"wrote {bundle}: evaluate it on imported features with\n"
          f"  vmr eval --checkpoint {bundle} --shards 'FEATURES/val-*.tar'")
    return 0
