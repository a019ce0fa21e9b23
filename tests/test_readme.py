"""The README's commands, run as written.

Every `vmr` command in the README's shell blocks must parse (its subcommand and flags exist).
The "Your own videos" walk-through then runs from top to bottom on tiny sample data in a fresh
directory (no repository layout: presets come from the package), with only these changes, which
fit it to a 2-core CPU and a test's minutes:
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmr.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SCALE_DOWN = [  # (README text, what the test runs instead)
    ("--config_file launch/multi_gpu.yaml --num_processes 8", "--config_file launch/cpu_2proc.yaml"),  # 8 GPUs
    ("--size 224", "--size 32"),  # the sample videos are 32 px
    ("--workers 8", "--workers 1"),
    ("configs/default.yaml", "configs/tiny.yaml"),  # CLIP ViT-B/32 from the hub: no network in tests
]
TINY_RUN = " train.max_steps=3 train.log_every=1 data.num_workers=0"  # appended to each training command
NOT_RUN = {  # commands of the walk-through that the suite covers elsewhere
    "launch/multi_node.yaml": "two machines: tests/test_hardening.py runs two over loopback",
    "vmr demo": "a server: tests/test_demo.py drives it in a browser",
}


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of ``text``: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_every_vmr_command_of_the_readme_parses():
    parser = build_parser()
    seen = 0
    for command in shell_commands((ROOT / "README.md").read_text()):
        words = shlex.split(command)
        if words[0] == "vmr":
            args = parser.parse_args(words[1:])  # SystemExit (exit 2) on an unknown subcommand or flag
        elif words[:2] == ["accelerate", "launch"]:
            assert "-m" in words, command
            module, rest = words[words.index("-m") + 1], words[words.index("-m") + 2:]
            args = parser.parse_args(["train" if module == "vmr.train" else rest.pop(0), *rest])
        else:
            continue
        assert args.handler is not None
        seen += 1
    assert seen >= 10


def test_the_walk_through_is_what_the_test_runs():
    """The scaled-down changes all apply: the README still says what this test replaces."""
    text = " ".join(shell_commands(section("Your own videos")))
    for written, _ in SCALE_DOWN:
        assert written in text, written
    for marker in NOT_RUN:
        assert marker in text, marker


@pytest.mark.slow
@pytest.mark.multiprocess
def test_your_own_videos_walk_through_runs(synth_dir, tmp_path):
    work = tmp_path / "elsewhere"  # not the repository: presets come from the installed package
    shutil.copytree(synth_dir / "videos", work / "my_videos")
    shutil.copy(synth_dir / "train.jsonl", work / "my_train.jsonl")
    shutil.copy(synth_dir / "val.jsonl", work / "my_val.jsonl")
    shutil.copy(next((work / "my_videos").glob("*.mp4")), work / "my_videos" / "kitchen_01.mp4")
    (work / "launch").symlink_to(ROOT / "launch")  # launch files live outside the package
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    ran = []
    for command in shell_commands(section("Your own videos")):
        if any(marker in command for marker in NOT_RUN):
            continue
        for written, instead in SCALE_DOWN:
            command = command.replace(written, instead)
        if "vmr.train" in command or command.startswith("vmr train"):
            command += TINY_RUN
        result = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        ran.append((command, result))
    assert [c.split()[:2] for c, _ in ran] == [["vmr", "shards"]] * 3 + [["vmr", "train"], ["accelerate", "launch"]] + \
        [["vmr", "eval"]] * 2 + [["vmr", "predict"], ["vmr", "index"], ["vmr", "search"]]
    metrics = json.loads((work / "runs" / "mine" / "metrics.json").read_text())
    assert "MR-full-R1@0.5" in metrics["brief"]
    predicted = json.loads(ran[-3][1].stdout)
    assert [p["query"] for p in predicted] == ["a person opens the fridge", "a person washes a cup"]
    assert predicted[0]["moments"] and len(predicted[0]["frame_times"]) == len(predicted[0]["frame_scores"]) > 0
    found = json.loads(ran[-1][1].stdout)
    assert found["query"] == "a person opens the fridge" and 0 < len(found["results"]) <= 5
    assert {r["video"] for r in found["results"]} <= {p.stem for p in (work / "my_videos").iterdir()}
    assert (work / "runs" / "mine" / "export_best" / "model.safetensors").is_file()
