import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmr.data.tars import iter_shard

from .conftest import free_port

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_two_ranks_two_workers(shard_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(HERE / "launch_stream.py"), str(shard_dir), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    expected = [meta["video_id"] for tar in sorted(shard_dir.glob("*.tar")) for _, _, meta in iter_shard(tar)]
    # Evaluation: every sample exactly once over both ranks.
    assert sorted(ranks[0]["eval"] + ranks[1]["eval"]) == sorted(expected)
    assert ranks[0]["eval"] and ranks[1]["eval"]
    # Training: the same number of steps on every rank (4 videos, 2 ranks, batch 1: 2 each).
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
