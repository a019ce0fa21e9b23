import subprocess
import sys
from pathlib import Path

import pytest

from vmr.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [[], ["synth"], ["shards"], ["shards", "build"], ["shards", "verify"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: vmr" in capsys.readouterr().out


def test_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--out", "x", "--videos", "many"])
    assert exit_.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_missing_videos_folder_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vmr.cli", "shards", "build", "--videos", str(tmp_path / "nope"),
         "--annotations", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"vmr shards: error: --videos: {tmp_path / 'nope'} is not a folder"


def test_shards_entry_script_runs_the_same_code(synth_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "shards" / "build.py"), "--videos", str(synth_dir / "videos"),
         "--annotations", str(synth_dir / "val.jsonl"), "--out", str(tmp_path), "--split", "val"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "val-000000.tar").is_file()


def test_unknown_annotation_format_is_one_line(synth_dir, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("just some words\n")
    assert main(["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations", str(notes),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "notes.txt: cannot tell the annotation format" in err
