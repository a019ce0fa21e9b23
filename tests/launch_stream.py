"""Run under `accelerate launch` by test_stream_multiprocess.py: each rank reads the shards through
the real loader (2 DataLoader workers) and writes what it saw to OUT/rank<N>.json."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from vmr.config import DataConfig, SamplingConfig
from vmr.data.stream import make_loader
from vmr.text import load_tokenizer


def main(shards: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)  # without cpu=True every CPU rank believes it is alone
    tokenizer = load_tokenizer("synthetic")
    data = DataConfig(sampling=SamplingConfig(fps=2.0, size=16), num_workers=2)
    evaluation = make_loader(shards, data, tokenizer, batch_size=1, train=False)
    seen = [vid for batch in evaluation for vid in batch["video_id"]]
    training = make_loader(shards, data, tokenizer, batch_size=1, train=True)
    steps = sum(1 for _ in training)
    result = {"rank": accelerator.process_index, "world": accelerator.num_processes, "eval": seen, "steps": steps}
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
