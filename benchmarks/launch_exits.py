"""How often a finished multi-process run fails at exit: every multi-process entry point launched
many times through `accelerate launch` on this machine's CPUs, with a busy loop on one core (load
makes an exit race likelier), counting launches that failed and those that aborted (a rank killed by
SIGABRT, "terminate called without an active exception", exit -6).

    .venv/bin/python benchmarks/launch_exits.py --rounds 20 --out benchmarks/reports/exits.json

One round launches each entry point once: 2-process DDP training, DeepSpeed ZeRO-2 (bf16) and
ZeRO-3 training, a 2-process `vmr eval --checkpoint`, a 2-process `vmr features extract`. Tiny
shards and a tiny bundle are built first in a temporary folder. The logs of failed launches are kept
beside --out (PYTHONFAULTHANDLER=1: an aborting process prints the Python stack of every thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmr.bundle import write_bundle

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ROOT / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(work: Path) -> tuple[Path, Path]:
    from vmr.config import load_config
    from vmr.data.shards import build_shards
    from vmr.model import VideoMomentRetrievalModel
    from vmr.synth import synthesize

    synth, shards = work / "synth", work / "shards"
    synthesize(synth, videos=4, queries_per_video=3, min_duration=6.0, max_duration=9.0, fps=5.0, size=32, seed=7,
               progress=False)
    for split in ("train", "val"):
        build_shards(synth / "videos", [synth / f"{split}.jsonl"], shards, split=split, fps=2.0, size=16,
                     keyframe_interval=0, max_videos_per_shard=1, progress=False)
    cfg = load_config(TINY, ["data.sampling.size=16"])
    write_bundle(VideoMomentRetrievalModel.from_config(cfg.model), work / "bundle", cfg)
    return shards, work / "bundle"


def entry_points(shards: Path, bundle: Path, run: Path) -> dict[str, list[str]]:
    """The command of each entry point, writing under ``run`` (emptied before each launch)."""
    train = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
             "data.sampling.size=16", "data.num_workers=0", f"train.output_dir={run}/train", "train.max_steps=2",
             "train.batch_size=2", "train.warmup_steps=1", "train.save_every=2", "train.eval_every=2",
             "train.eval_batch_size=2"]
    ddp = ["--config_file", str(ROOT / "launch/cpu_2proc.yaml")]

    def zero(stage: int) -> list[str]:
        return ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / f"launch/ds_zero{stage}.json")]

    return {
        "ddp-train": [*ddp, "-m", "vmr.train", "--config", str(TINY), *train],
        "zero2-train": [*zero(2), "-m", "vmr.train", "--config", str(TINY), *train, "train.mixed_precision=bf16"],
        "zero3-train": [*zero(3), "-m", "vmr.train", "--config", str(TINY), *train, "train.mixed_precision=no"],
        "eval": [*ddp, "-m", "vmr.cli", "eval", "--checkpoint", str(bundle), "--shards", f"{shards}/val-*.tar",
                 "--predictions-out", str(run / "predictions.jsonl")],
        "features": [*ddp, "-m", "vmr.cli", "features", "extract", "--config", str(TINY), "--shards", str(shards),
                     "--out", str(run / "features"), "data.sampling.size=16"],
    }


def launch(args: list[str], run: Path, timeout: int) -> tuple[int, str]:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    command = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--main_process_port", str(free_port()),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
        return process.returncode, out
    except subprocess.TimeoutExpired:
        # A hang: SIGABRT to every rank makes each print the Python stack of all its threads
        # (PYTHONFAULTHANDLER), which says where it waited; then the whole launch is killed.
        import psutil

        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGABRT)
        time.sleep(5)
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return -999, f"timed out after {timeout} s (hung; stacks below)\n{out}"


def aborted(log: str) -> bool:
    return not log.startswith("timed out") and ("SIGABRT" in log or "exitcode  : -6" in log
                                                 or "terminate called" in log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="launches of each entry point (default 20)")
    parser.add_argument("--only", nargs="+", help="entry points to launch (default: all)")
    parser.add_argument("--no-load", action="store_true", help="no busy loop beside the launches")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per launch before it counts as hung")
    parser.add_argument("--out", type=Path, required=True, help="JSON report; failed launches' logs beside it")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    work = Path(tempfile.mkdtemp(prefix="vmr-exits-"))
    busy = None
    try:
        shards, bundle = make_data(work)
        commands = entry_points(shards, bundle, work / "run")
        unknown = sorted(set(args.only or []) - set(commands))
        if unknown:
            parser.error(f"--only: unknown entry point(s) {', '.join(unknown)}; known: {', '.join(commands)}")
        names = args.only or list(commands)
        if not args.no_load:  # one core kept busy
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        counts = {name: {"launches": 0, "failed": 0, "aborted": 0, "hung": 0, "seconds": 0.0} for name in names}
        logs = args.out.with_suffix("")
        started = time.perf_counter()
        for round_ in range(args.rounds):
            for name in names:
                t0 = time.perf_counter()
                code, log = launch(commands[name], work / "run", args.timeout)
                entry = counts[name]
                entry["launches"] += 1
                entry["seconds"] += time.perf_counter() - t0
                if code != 0:
                    entry["failed"] += 1
                    entry["aborted"] += aborted(log)
                    entry["hung"] += code == -999
                    logs.mkdir(parents=True, exist_ok=True)
                    (logs / f"{name}-{round_}.log").write_text(log)
                    print(f"round {round_} {name}: exit {code}{' (abort)' if aborted(log) else ''}", file=sys.stderr)
            done = sum(c["launches"] for c in counts.values())
            bad = sum(c["failed"] for c in counts.values())
            print(f"round {round_ + 1}/{args.rounds}: {done} launches, {bad} failed "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        if busy is not None:
            busy.kill()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "load": "one core busy" if not args.no_load else "none",
        "launches": sum(c["launches"] for c in counts.values()),
        "failed": sum(c["failed"] for c in counts.values()),
        "aborted": sum(c["aborted"] for c in counts.values()),
        "hung": sum(c["hung"] for c in counts.values()),
        "seconds": round(time.perf_counter() - started, 1),
        "entry_points": {k: {**v, "seconds": round(v["seconds"], 1)} for k, v in counts.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
