"""The ``vmr`` command: one entry point, one subcommand per job.

``main(argv)`` is callable in-process (the tests do). A UserError becomes one line on stderr and
exit code 2; argparse reports bad flags the same way. Heavy imports (torch, torchcodec) happen
inside the subcommands so that ``vmr --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from vmr import __version__
from vmr.errors import UserError

EPILOG = """examples:
  vmr synth --out data/synth
  vmr shards build --videos data/synth/videos --annotations data/synth/train.jsonl --out data/shards --split train
  vmr shards verify data/shards
  vmr train --config configs/tiny.yaml train.max_steps=200
  vmr eval --predictions preds.jsonl --ground-truth val.jsonl --json metrics.json
  vmr predict --checkpoint runs/quickstart --video clip.mp4 --query "a red circle spins"
  vmr bench loader --quick
"""


def add_command(commands, add_arguments, handler, name: str, help: str, description: str,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """One subcommand: its texts, its arguments (``add_arguments(parser)``) and its handler. An
    epilog (examples) is printed as written."""
    p = commands.add_parser(name, help=help, description=description, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmr",
        description="Video moment retrieval at scale: sample data, WebDataset shards, training, evaluation.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"vmr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from vmr import synth
    from vmr.data import parts, shards, verify

    add_command(
        commands, synth.add_arguments, synth.run,
        "synth", help="make learnable synthetic videos and annotations",
        description="Make learnable synthetic videos (coloured shapes doing actions) with exact "
                    "annotations in the seed and QVHighlights formats.",
    )

    p = commands.add_parser("shards", help="build, merge and verify WebDataset shards",
                            description="Build (whole, or in parts on many machines), merge and verify WebDataset tar shards of videos and their queries.")
    shard_commands = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    add_command(
        shard_commands, shards.add_build_arguments, shards.run_build,
        "build", help="pack videos and annotations into shards",
        description="Pack videos and their annotations into WebDataset tar shards: one sample per "
                    "video with all of its queries. Bad videos and queries are skipped and listed "
                    "in the manifest; everything valid is written.",
        epilog="examples:\n  vmr shards build --videos data/synth/videos --annotations data/synth/train.jsonl "
               "--out data/shards --split train --fps 2 --size 112 --keyframe-interval 1\n"
               "  sbatch --array=0-19 --wrap 'vmr shards build --videos /data/videos --annotations train.jsonl "
               "--out /shared/shards --split train --fps 2 --size 224 --keyframe-interval 0 --workers 48'",
    )
    add_command(
        shard_commands, parts.add_merge_arguments, parts.run_merge,
        "merge", help="join the parts of a split built on several machines",
        description="Check that every part 0..N-1 of a split is recorded (OUT/parts/), that no video is in two "
                    "parts and that every recorded shard is there unchanged, then write the split's manifest in "
                    "one step. The last part to finish does this itself when it sees all the others.",
        epilog="example:\n  vmr shards merge --out /shared/shards --split train",
    )
    add_command(
        shard_commands, verify.add_verify_arguments, verify.run_verify,
        "verify", help="check shards against their manifest",
        description="Re-read every shard: sha256 and counts against manifest.json, and decode "
                    "frames of every video. Exits non-zero naming the shard and key of any problem.",
    )

    from vmr import features

    p = commands.add_parser("features", help="the frozen-feature cache: extract or import feature shards",
                            description="Feature shards: the frozen vision tower's output for every frame, "
                                        "computed once, or the field's released features; train, eval and "
                                        "predict read them in place of video shards.")
    feature_commands = p.add_subparsers(dest="features_command", metavar="ACTION", required=True)
    add_command(
        feature_commands, features.add_extract_arguments, features.run_extract,
        "extract", help="decode video shards once and cache CLIP's vision features",
        description="Decode every video of the shards once at the model's sampling spec, run the frozen "
                    "vision tower on each frame, and write feature shards (one per input shard, atomic, "
                    "resumable; each process of 'accelerate launch' takes its own shards).",
        epilog="examples:\n  vmr features extract --checkpoint runs/small --shards data/shards --out data/features\n"
               "  accelerate launch -m vmr.cli features extract --config configs/small.yaml --shards data/shards "
               "--out data/features",
    )
    add_command(
        feature_commands, features.add_import_arguments, features.run_import,
        "import", help="pack released per-clip features (<vid>.npz) into feature shards",
        description="Pack features in the Moment-DETR / Lighthouse / UniVTG release layout (<vid>.npz with "
                    "'features' (clips, dim); qid<qid>.npz text features) with their annotations into "
                    "feature shards.",
        epilog="example:\n  vmr features import --video-features clip_features slowfast_features "
               "--text-features clip_text_features --annotations highlight_train_release.jsonl --out data/qvh_features",
    )

    from vmr import train

    add_command(
        commands, train.add_arguments, train.run,
        "train", help="train a model (the same as 'accelerate launch -m vmr.train')",
        description="Train on WebDataset shards with the config's preset plus overrides. For several "
                    "processes or GPUs, DeepSpeed or multi-node runs use 'accelerate launch "
                    "--config_file launch/X.yaml -m vmr.train --config FILE ...'.",
        epilog="examples:\n  vmr train --config configs/tiny.yaml train.max_steps=200\n"
               "  vmr train --config configs/tiny.yaml --resume latest",
    )

    from vmr.eval import predict

    add_command(
        commands, predict.add_eval_arguments, predict.run_eval,
        "eval", help="score predictions (official protocols), or predict on shards and score",
        description="Score a predictions file against ground truth with an official protocol (QVHighlights, "
                    "Charades-STA, ..., TVR's corpus protocol), or run a trained model over shards first. Prints a "
                    "leaderboard row; --json writes the official metrics layout.",
        epilog="examples:\n  vmr eval --predictions preds.jsonl --ground-truth data/highlight_val_release.jsonl\n"
               "  vmr eval --protocol tvr --predictions predictions.json --ground-truth tvr_val_release.jsonl\n"
               "  vmr eval --checkpoint runs/quickstart --shards data/shards/val-*.tar --json metrics.json",
    )

    add_command(
        commands, predict.add_predict_arguments, predict.run_predict,
        "predict", help="find the moments of one or more queries in one video (JSON on stdout)",
        description="Decode a video (any format FFmpeg reads) once, run a trained model and print the "
                    "ranked moments in seconds with a score per frame as JSON, for each query.",
        epilog="examples:\n  vmr predict --checkpoint runs/quickstart --video clip.mp4 --query 'a red circle spins'\n"
               "  vmr predict --checkpoint runs/quickstart --video clip.mp4 --query 'a red circle spins' "
               "--query 'a blue square grows'",
    )

    from vmr import search

    add_command(
        commands, search.add_index_arguments, search.run_index,
        "index", help="encode a collection of videos once, to search it",
        description="Run the vision tower once on every frame of every video of a folder or of video shards "
                    "and store the result (feature shards) as an index for 'vmr search'. Resumable; under "
                    "'accelerate launch' the processes share the parts.",
        epilog="examples:\n  vmr index --checkpoint runs/quickstart --videos my_videos/ --out my_index\n"
               "  vmr index --checkpoint runs/quickstart --shards 'data/shards/val-*.tar' --out val_index",
    )
    add_command(
        commands, search.add_search_arguments, search.run_search,
        "search", help="find a sentence's best moments over a whole indexed collection (JSON on stdout)",
        description="Rank the moments of every video of an index for a sentence: a cheap shortlist of the "
                    "videos over the whole collection, then the full model on the best of them.",
        epilog="examples:\n  vmr search --index my_index --query 'a person opens the fridge' --top-k 5\n"
               "  vmr search --index my_index --queries tvr_val.jsonl --out predictions.json",
    )

    from vmr import convert

    add_command(
        commands, convert.add_arguments, convert.run,
        "convert", help="a released Moment-DETR / QD-DETR checkpoint -> a vmr inference bundle",
        description="Convert a checkpoint file as the Moment-DETR and QD-DETR repositories save and release it "
                    "(its 'model' weights and 'opt' settings) into an inference bundle with the same settings. "
                    "The file is read without running any code from it.",
        epilog="example:\n  vmr convert --checkpoint model_best.ckpt --out runs/qd_detr_released\n"
               "  vmr eval --checkpoint runs/qd_detr_released --shards 'data/qvhighlights/features/val-*.tar'",
    )

    from vmr import demo

    add_command(
        commands, demo.add_arguments, demo.run,
        "demo", help="the Streamlit app: find moments in your own video",
        description="Start the Streamlit demo: upload a video or pick a sample, type a query, see the "
                    "ranked moments, their thumbnails and the scores over time.",
        epilog="example:\n  vmr demo --checkpoint runs/quickstart --port 8501",
    )

    from vmr import bench

    add_command(
        commands, bench.add_arguments, bench.run,
        "bench", help="the benchmark suite: decode, loader, train, infer",
        description="Measure decode, loader, training and inference speed with warm-up, repetitions and "
                    "medians, beside the design targets and the original project's promises.",
        epilog="examples:\n  vmr bench all --quick --json bench.json\n  vmr bench infer --device cuda",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"vmr {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vmr {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        if error.filename is None:  # not about a path the user named: a bug, with its traceback
            raise
        # A path the user named or a file named one: it exists as a file, cannot be read or made,
        # is too long for the file system. One line naming it, like every other bad input.
        where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
        print(f"vmr {args.command}: error: {where}: {error.strerror or error}", file=sys.stderr)
        return 2


def entry() -> None:
    """The installed ``vmr`` command (and ``python -m vmr.cli``): ``main``, then a clean exit."""
    from vmr.runtime import run_entry

    run_entry(main)


if __name__ == "__main__":
    entry()
