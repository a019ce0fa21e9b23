"""The input pipeline: WebDataset shards -> torchcodec decode in DataLoader workers -> batches.

``make_loader(shards, cfg.data, ...)`` is the one entry point for training, evaluation and the
benchmarks. The stages, each in its own module, are steps in ``ShardStream.__iter__``:

  sources.py    shard URLs, bounded downloads, the count of unreadable shards and samples
  (here)        dealing shards or samples to (rank, worker) slots, shuffling
  decode.py     a sample -> items (windows of a video, with its queries), by the sampling spec
  collate.py    items -> one padded batch (the batch contract is documented there)
  prefetch.py   batches onto the device while the step before computes

Stage functions live at module level so they pickle into worker processes. The loader is never
passed through ``accelerator.prepare``: ranks and workers split the shards here, and
``skipped(loader)`` counts shards and samples that could not be read (they are skipped, the
stream goes on; ``loader.skip_counter.last_reason`` says why).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import webdataset as wds

from vmr.config import DataConfig, SamplingConfig
from vmr.data.annotations import read_annotations
from vmr.data.collate import BatchShape, Collator
from vmr.data.decode import decode_stage, window_item
from vmr.data.sources import (
    MAX_FAILURES_IN_A_ROW,
    FailureGuard,
    SkipCounter,
    StreamError,
    bounded_downloads,
    count_samples,
    distributed_rank,
    expand_shards,
)
from vmr.data.video import find_video, keyframe_indices, open_video, sample_frames, sample_times
from vmr.errors import UserError


def shuffled(samples, buffer: int, rng: random.Random):
    """A shuffle buffer that never mixes two epochs: up to ``buffer`` samples are held and a random
    one is released for each new one; the rest is released, in random order, when ``samples`` ends."""
    held: list = []
    for sample in samples:
        held.append(sample)
        if len(held) >= buffer:
            yield held.pop(rng.randrange(len(held)))
    rng.shuffle(held)
    yield from held


def deal(urls: list[str], slot: int, slots: int) -> tuple[list[str], int, int]:
    """This (rank, worker) slot's share of ``urls``: (shards to read, keep every ``every``-th sample
    starting at ``index``). Whole shards per slot when there are at least as many shards as slots;
    else every slot reads them all and keeps every ``slots``-th sample."""
    if len(urls) >= slots:
        return urls[slot::slots], 0, 1
    return list(urls), slot, slots


def _share(samples, index: int, every: int, counts: list[int]):
    """Keep the samples at positions ``index``, ``index + every``, ...; count seen and kept."""
    for sample in samples:
        counts[0] += 1
        if (counts[0] - 1) % every == index % every:
            counts[1] += 1
            yield sample


def epoch_samples(urls: list[str], seed: str, slot: int, slots: int, handler, buffer: int, rng: random.Random):
    """Training: tar samples for one (rank, worker) slot, epoch after epoch, forever. Each epoch
    puts the shards in an order drawn for the epoch (the same on every rank) and deals them out
    (``deal``). So over all slots an epoch reads every video once; a slot whose share runs out
    before its quota goes on into the next epoch's share, so no worker ever runs dry and every rank
    runs the same number of steps (no end-of-epoch hang). With fewer samples than slots, a slot
    left without any shares them with the others. Samples are shuffled within the slot's share of
    each epoch (``buffer`` at a time)."""
    epoch, empty_passes, modulus = 0, 0, None
    while True:
        order = list(urls)
        random.Random(f"{seed}-order-{epoch}").shuffle(order)
        mine, index, every = deal(order, slot, slots)
        if modulus is not None:  # more slots than samples: take sample slot % seen, shared with another slot
            index, every = slot % modulus, modulus
        tars = wds.tarfile_to_samples(handler=handler)({"url": u} for u in mine)
        counts = [0, 0]  # samples seen in this pass, and kept by this slot
        yield from shuffled(_share(tars, index, every, counts), buffer, rng)
        seen, own = counts
        if own == 0 and seen > 0 and every > 1:
            modulus = seen
        empty_passes = empty_passes + 1 if own == 0 else 0
        if empty_passes >= MAX_FAILURES_IN_A_ROW:
            raise StreamError(f"{empty_passes} passes over this worker's share of {len(urls)} shard(s) found "
                              "no sample (empty shards?)")
        epoch += 1


def once_samples(urls: list[str], slot: int, slots: int, handler):
    """Evaluation: tar samples for one slot, every sample exactly once over all slots, in order."""
    mine, index, every = deal(urls, slot, slots)
    return _share(wds.tarfile_to_samples(handler=handler)({"url": u} for u in mine), index, every, [0, 0])


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from shards for one rank. Training: each epoch's shards dealt out over ranks and
    workers (``epoch_samples``), shuffled, augmented, exactly ``epoch_batches`` batches per epoch
    on every rank. Evaluation: every sample exactly once over
    all ranks and workers, in order, no augmentation."""

    def __init__(self, urls: list[str], data: DataConfig, tokenizer, batch_size: int,
                 train: bool, rank: int, world: int, epoch_batches: int | None, counter: SkipCounter):
        super().__init__()
        self.urls, self.data, self.batch_size = urls, data, batch_size
        self.train, self.rank, self.world, self.epoch_batches = train, rank, world, epoch_batches
        shape = BatchShape(data.sampling.window, batch_size * data.queries_per_video)
        self.collate = Collator(tokenizer, data.max_text_len, shape if train else None)
        self.counter = counter
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseeds shuffling and augmentation; call before iterating an epoch."""
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        guard = FailureGuard(self.counter, worker)
        handler = guard.tar_handler

        if self.train:
            rng = random.Random(f"{self.data.seed}-{self.epoch}-{slot}")
            # At this point we have tar samples: {"__key__", "mp4": bytes, "json": bytes}, this
            # slot's share of each epoch's shards, forever.
            stream = epoch_samples(self.urls, f"{self.data.seed}-{self.epoch}", slot, slots, handler,
                                   self.data.shuffle_buffer, rng)
        else:
            rng = None
            # Every sample once over all (rank, worker) slots.
            stream = once_samples(self.urls, slot, slots, handler)

        # Decoded: {"frames": uint8 (t, 3, s, s), "times", "duration", "queries", ...} per window:
        # one per video in training, every window of each video in evaluation.
        stream = decode_stage(stream, self.data, rng, self.train, guard)
        # Batched and collated: the dict described at the top of this file.
        stream = wds.batched(self.batch_size, collation_fn=self.collate, partial=not self.train)(stream)

        if self.train:
            # The rank's epoch_batches split over its workers: every rank runs the same number of steps.
            quota = self.epoch_batches // workers + (1 if worker < self.epoch_batches % workers else 0)
            for _, batch in zip(range(quota), stream, strict=False):
                yield batch
        else:
            yield from stream


def make_loader(shards: str | list[str], data: DataConfig, tokenizer, batch_size: int, train: bool,
                rank: int | None = None, world: int | None = None,
                epoch_batches: int | None = None, num_workers: int | None = None):
    """A DataLoader of batches for this rank (see ShardStream). ``loader.skipped`` is the number
    of samples skipped as undecodable so far; ``loader.dataset.set_epoch(e)`` reseeds."""
    urls = expand_shards(shards, data.allow_pipe)
    bounded_downloads()  # inherited by the forked workers
    if rank is None or world is None:
        rank, world = distributed_rank()
    workers = data.num_workers if num_workers is None else num_workers
    if train and epoch_batches is None:
        samples = data.epoch_samples or count_samples(urls)
        if samples is None:
            raise UserError("data.epoch_samples: shards without a manifest.json beside them need the "
                            "number of videos per epoch")
        epoch_batches = max(1, math.ceil(samples / (world * batch_size)))
    counter = SkipCounter(workers)
    stream = ShardStream(urls, data, tokenizer, batch_size, train, rank, world, epoch_batches, counter)
    # Batches are complete when they leave the stream: no default_convert walk over every field.
    # Pinned (page-locked) batches on CUDA: only those copy to the device while it computes.
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         persistent_workers=False, prefetch_factor=2 if workers else None,
                                         pin_memory=torch.cuda.is_available())
    loader.skip_counter = counter
    return loader


def _as_is(batch: dict) -> dict:
    return batch


def skipped(loader) -> int:
    return loader.skip_counter.total


# ----- map-style access to loose files (small data, the demo) -------------------------------------


class VideoMomentDataset(torch.utils.data.Dataset):
    """Videos in a folder plus an annotation file (any supported format), one item per video in
    the same format as the stream's decoded items; batch them with ``Collator``. Every query of a
    video, the whole video at ``sampling.fps`` (one window however long: for small data), no
    augmentation. ``sampling.frames`` says where each frame sits in its 1/fps bin: ``uniform`` at the
    centre, ``random`` anywhere (seeded by the item's index), ``keyframes`` the video's key frames."""

    def __init__(self, video_dir: str | Path, annotation_file: str | Path, sampling: SamplingConfig | None = None):
        self.video_dir = Path(video_dir)
        records, _ = read_annotations(Path(annotation_file))
        self.videos: dict[str, list] = {}
        for record in records:
            self.videos.setdefault(record.video_id, []).append(record)
        self.ids = list(self.videos)
        self.sampling = sampling or SamplingConfig(frames="uniform")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        from vmr.data.video import probe

        video_id, spec = self.ids[index], self.sampling
        records = self.videos[video_id]
        try:
            path = find_video(self.video_dir, video_id, records[0].video_file)
        except ValueError as error:
            raise UserError(str(error)) from None
        if path is None:
            raise UserError(f"{self.video_dir}: no video file for {video_id!r}")
        info = probe(path, check_decode=False)
        decoder = open_video(path)
        if spec.frames == "keyframes":
            indices = keyframe_indices(decoder, (0.0, info.duration), 1 << 30)
            frames, pts = sample_frames(decoder, None, spec.size, info.start, indices=indices)
        else:
            rng = random.Random(index) if spec.frames == "random" else None
            frames, pts = sample_frames(decoder, sample_times(info.duration, spec.frames, spec.fps, info.num_frames,
                                                              rng=rng),
                                        spec.size, info.start)
        queries = [{"qid": r.qid, "query": r.query, "windows": r.seconds(info.fps), "saliency": r.saliency}
                   for r in records]
        meta = {"video_id": video_id, "duration": info.duration}
        return window_item(meta, path.name, frames, pts, (0.0, info.duration), (0, len(pts)), (0, 1), queries)
