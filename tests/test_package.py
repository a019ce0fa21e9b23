"""vmr as an installed package: a wheel built from this tree, installed (not editable) into a fresh
virtual environment, run from a directory that is not the repository. Presets must come from the
package itself (no ``Path(__file__).parents`` into a checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed. Its dependencies come from this environment through a
    path file (the wheel alone is what is tested; downloading torch again is not)."""
    work = tmp_path_factory.mktemp("package")
    run = dict(check=True, capture_output=True, text=True, timeout=600)
    # Built from a copy: setuptools writes build/ and egg-info beside the sources.
    source = work / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(work / "dist"), str(source)], **run)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], **run)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               **run).stdout.strip())
    # Appended after the venv's own site-packages: the installed vmr wins over the editable one.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next((work / "dist").glob("vmr-*.whl"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--no-index", str(wheel)], **run)
    return venv


@pytest.mark.slow
def test_the_installed_package_runs_from_any_directory(installed, shard_dir, synth_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def vmr(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(installed / "bin" / "vmr"), *args], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"vmr {' '.join(args)}\n{result.stderr[-3000:]}"
        return result

    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import vmr; print(vmr.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed), where  # not the checkout
    # A preset by name and by its repository path, from a folder that has neither.
    vmr("train", "--config", "configs/tiny.yaml", f"data.train_shards={shard_dir}/train-*.tar", "data.val_shards=[]",
        "data.sampling.size=16", "data.num_workers=0", "train.max_steps=2", "train.output_dir=run")
    video = next((synth_dir / "videos").glob("*.mp4"))
    predicted = json.loads(vmr("predict", "--checkpoint", "run", "--video", str(video), "--query", "a red circle").stdout)
    assert predicted["moments"]
    report = tmp_path / "bench.json"
    vmr("bench", "infer", "--quick", "--json", str(report))  # the tiny preset, found inside the package
    assert json.loads(report.read_text())["infer"]["config"] == "tiny (fp32)"
