"""A collection's compact keys on disk and their approximate-nearest-neighbour index: what lets
``vmr search`` outgrow memory.

A model trained with ``model.corpus`` gives every frame a compact key (``key_dim`` numbers) and every
sentence a key; a video's score for a sentence is its best frame's dot product (vmr/model/corpus.py).
An index folder (``vmr index``) holds, beside its feature shards, ``keys/<model>/`` (``<model>``: a
fingerprint of the weights the keys depend on, so another model's keys never mix in):

  ``NNNNNN.npy`` + ``NNNNNN.json``  one part per feature shard: the float16 keys of its frames, and
      its videos (id, duration, frames, where its tokens and times lie in the tar, their crc32). Made
      in parts over processes and resumed: a part whose shard's sha256 is the manifest's is kept.
  the merged collection: ``keys.npy`` (float16, every frame), ``frames.npy`` (each frame's video),
      ``table.npy`` (each video's shard and byte ranges), ``durations.npy``, ``ids.json``, ``ann.faiss``
      (FAISS over the keys: exact inner product up to FLAT_MAX frames, IVF-PQ beyond, on the GPU where
      FAISS has one), and ``collection.json``, written last: a collection is whole or absent.

A search asks the ANN index for the best frames, rescored exactly from ``keys.npy`` (memory-mapped:
only those rows are read), keeps each video's best frame until ``count`` videos are found, and reads
only those videos' tokens from their shards (``load``). Memory is the ANN index's (with IVF-PQ 16
bytes and an id per frame) and the per-video table's, not the tokens'.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from vmr.data.tars import TIMES, TOKENS, sha256_of
from vmr.encode import EncodedVideo, check_encodings, encoded, sample_video
from vmr.errors import UserError
from vmr.io import confined, first_line, json_text, objects, read_json, write_text_atomic

KEYS = "keys"
COLLECTION = "collection.json"
FLAT_MAX = 1_000_000  # frame keys searched exactly; beyond, IVF-PQ (vmr bench search measured why)
NPROBE = 256  # IVF lists a query visits (of at most MAX_LISTS)
MAX_LISTS = 2048
FRAMES_PER_VIDEO = 128  # best frames asked per video wanted (more are asked until enough videos are seen)
SMALL = ("ids.json", "table.npy", "durations.npy")  # checked by sha256 when opened: a few bytes per video
LARGE = ("keys.npy", "frames.npy", "ann.faiss")  # by size (each row read is checked when used)
COLUMNS = 7  # table.npy: shard, tokens (offset, size, crc32), times (offset, size, crc32)


def check_corpus_model(config, where: str) -> None:
    """A model (its ModelConfig) that can search a collection: vmr's head, trained with model.corpus."""
    if config.head != "vmr":
        raise UserError(f"a model with model.head {config.head} cannot search a collection: the search "
                        "ranks videos by vmr's corpus keys; use vmr predict or vmr eval per video")
    if not config.corpus.enabled:
        raise UserError(f"{where}: this model was trained without model.corpus, so its scores do not compare "
                        "across videos; train with model.corpus.enabled=true (configs/tiny.yaml has it on)")


def fingerprint(model) -> str:
    """Of the weights a frame's key depends on (the frame projection and the key layers)."""
    digest = hashlib.sha256()
    for module in (model.head.frame_in, model.head.keys):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def keys_folder(folder: Path, model) -> Path:
    return Path(folder) / KEYS / fingerprint(model)


def _shards(manifest: dict) -> list[dict]:
    return [entry for split in manifest["splits"].values() for entry in split["shards"]]


def _save_npy(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.save(f, array)
    os.replace(partial, path)


def read_npy(path: Path, kind: str, shape: tuple, mmap: bool = False) -> np.ndarray:
    """A .npy file of numbers of ``kind`` (numpy kinds, e.g. "f" or "iu") and ``shape`` (None: any
    length), or a one-line UserError naming it."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as error:  # truncated, not numpy, a pickle: numpy's many types
        raise UserError(f"{path}: not a readable .npy file ({first_line(error, 120)}); rebuild the keys with "
                        "'vmr index'") from None
    if array.dtype.kind not in kind or array.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape, strict=True)):
        raise UserError(f"{path}: holds {array.dtype} {array.shape}, expected {kind} {shape}; rebuild the keys "
                        "with 'vmr index'")
    return array


# ----- building: one part per shard, then the merge ------------------------------------------------


def build_keys(folder: Path, model, rank: int = 0, world: int = 1, progress: bool = False) -> int:
    """Each shard of the index this process owns (every ``world``-th) gets its part, unless a part
    made from the same shard is there. Returns the parts made."""
    import torch
    from tqdm import tqdm

    check_corpus_model(model.config, str(folder))
    manifest, spec = check_encodings(folder, model)
    out = keys_folder(folder, model)
    out.mkdir(parents=True, exist_ok=True)
    made = 0
    mine = [(n, e) for n, e in enumerate(_shards(manifest)) if n % world == rank]
    for n, entry in tqdm(mine, desc="keys", unit="shard", disable=not progress):
        record = out / f"{n:06d}.json"
        if record.is_file() and (out / f"{n:06d}.npy").is_file():
            old = read_json(record)
            if old.get("sha256") == entry.get("sha256") and old.get("shard") == entry["path"]:
                continue
        shard = confined(Path(folder), entry["path"], str(Path(folder) / "manifest.json"))
        videos, keys, skipped = [], [], []
        with torch.no_grad():
            for video, ranges in _samples(shard, spec, manifest["extractor"], skipped):
                frames = video.tokens[None, :, :1].to(model.head.frame_in.weight.device)
                mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
                keys.append(model.head.frame_keys(frames, mask)[0].cpu().numpy().astype(np.float16))
                videos.append({"id": video.video_id, "duration": video.duration, "frames": len(video.times),
                               "ranges": ranges})
        width = model.config.corpus.key_dim
        _save_npy(out / f"{n:06d}.npy", np.concatenate(keys) if keys else np.zeros((0, width), np.float16))
        write_text_atomic(record, json_text({"shard": entry["path"], "sha256": entry.get("sha256"), "videos": videos,
                                             "skipped": skipped}, record) + "\n")
        made += 1
    return made


def _samples(path: Path, spec, extractor: dict, skipped: list):
    """(EncodedVideo, [tokens offset, size, crc32, times offset, size, crc32]) of each readable sample
    of a feature shard, with where its arrays lie in the tar; unreadable ones go to ``skipped``."""
    members: dict[str, dict] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = Path(member.name).name.partition(".")
                    data = tar.extractfile(member).read()
                    members.setdefault(key, {})[ext] = (member.offset_data, member.size, data)
    except (OSError, tarfile.TarError, EOFError) as error:
        raise UserError(f"{path}: not a readable tar shard ({first_line(error, 160)})") from None
    for key, sample in members.items():
        try:
            tokens, times = sample[TOKENS], sample[TIMES]
            video = sample_video(key, sample["json"][2], tokens[2], times[2], spec, extractor)
        except Exception as error:  # one bad sample: listed, the others go on
            skipped.append({"key": key, "shard": path.name, "reason": first_line(error)})
            continue
        yield video, [tokens[0], tokens[1], zlib.crc32(tokens[2]), times[0], times[1], zlib.crc32(times[2])]


def merge_keys(folder: Path, model) -> dict:
    """Every part, in the manifest's order, into the collection and its ANN index (see the module
    docstring); ``collection.json`` last. Returns that record."""
    import faiss

    manifest, _ = check_encodings(folder, model)
    out = keys_folder(folder, model)
    shards = _shards(manifest)
    keys, ids, durations, table, frame_video, skipped = [], [], [], [], [], []
    for n, entry in enumerate(shards):
        record_path = out / f"{n:06d}.json"
        if not record_path.is_file():
            raise UserError(f"{record_path}: missing (the keys of {entry['path']}); run 'vmr index' again")
        record = read_json(record_path)
        if record.get("sha256") != entry.get("sha256") or record.get("shard") != entry["path"]:
            raise UserError(f"{record_path}: made from another {entry['path']}; run 'vmr index' again")
        part = read_npy(out / f"{n:06d}.npy", "f", (None, model.config.corpus.key_dim))
        videos = [_part_video(v, f"{record_path}: videos[{i}]") for i, v in enumerate(objects(record, "videos",
                                                                                            str(record_path)))]
        if sum(v["frames"] for v in videos) != len(part):
            raise UserError(f"{record_path}: its videos do not account for the {len(part)} keys beside it; "
                            "run 'vmr index' again")
        skipped += objects(record, "skipped", str(record_path), default=[])
        for video in videos:
            frame_video.append(np.full(video["frames"], len(ids), dtype=np.int32))
            ids.append(video["id"])
            durations.append(video["duration"])
            table.append([n, *video["ranges"]])
        keys.append(part)
    if not ids:
        raise UserError(f"{folder}: holds no readable video")
    keys = np.concatenate(keys).astype(np.float16)
    _save_npy(out / "keys.npy", keys)
    _save_npy(out / "frames.npy", np.concatenate(frame_video))
    _save_npy(out / "table.npy", np.asarray(table, dtype=np.int64).reshape(-1, COLUMNS))
    _save_npy(out / "durations.npy", np.asarray(durations, dtype=np.float64))
    write_text_atomic(out / "ids.json", json_text(ids, out / "ids.json") + "\n")
    index, kind = ann_index(keys)
    faiss.write_index(index, str(out / "ann.faiss.partial"))
    os.replace(out / "ann.faiss.partial", out / "ann.faiss")
    record = {"fingerprint": out.name, "kind": kind, "videos": len(ids), "frames": len(keys), "files": {
        name: {"bytes": (out / name).stat().st_size, **({"sha256": sha256_of(out / name)} if name in SMALL else {})}
        for name in (*SMALL, *LARGE)},
              "key_dim": keys.shape[1], "skipped": skipped, "shards": [{"path": e["path"], "sha256": e.get("sha256")} for e in shards]}
    write_text_atomic(out / COLLECTION, json_text(record, out / COLLECTION, indent=1) + "\n")
    return record


def _part_video(video: dict, where: str) -> dict:
    """One video of a key part, checked field by field (what build_keys wrote)."""
    import math

    duration, frames, ranges = video.get("duration"), video.get("frames"), video.get("ranges")
    if not isinstance(video.get("id"), str) or not video["id"]:
        raise UserError(f"{where}: 'id' must be a video id; run 'vmr index' again")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
            or duration <= 0:
        raise UserError(f"{where}: 'duration' must be a positive number; run 'vmr index' again")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise UserError(f"{where}: 'frames' must be a positive integer; run 'vmr index' again")
    if not isinstance(ranges, list) or len(ranges) != COLUMNS - 1 or any(
            isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 2**63 for r in ranges):
        raise UserError(f"{where}: 'ranges' must be {COLUMNS - 1} byte offsets, sizes and checksums; "
                        "run 'vmr index' again")
    return video


def ann_index(keys: np.ndarray):
    """(FAISS index over ``keys`` by inner product, its kind): exact up to FLAT_MAX keys; beyond,
    IVF with about 4 sqrt(n) lists, at most MAX_LISTS (k-means on 2 cores stays within seconds),
    trained on 40 keys per list (FAISS asks for 39), and 16-byte product codes."""
    import faiss

    vectors = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = vectors.shape
    if n <= FLAT_MAX:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, "flat"
    lists = min(MAX_LISTS, int(4 * n ** 0.5) // 256 * 256 or 256)
    codes = 16 if d % 16 == 0 else next(m for m in (8, 4, 2, 1) if d % m == 0)
    index = faiss.index_factory(d, f"IVF{lists},PQ{codes}", faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.random.default_rng(0).choice(n, min(n, 40 * lists), replace=False)]
    index.train(sample)
    for first in range(0, n, 1 << 18):
        index.add(vectors[first:first + (1 << 18)])
    return index, "ivfpq"


# ----- searching -------------------------------------------------------------------------------------


class Collection:
    """An index's merged keys, opened: ``shortlist(query_key, count)`` and ``load(video)``.
    ``Collection.open(folder, model)`` builds what is missing or stale first (one process)."""

    def __init__(self, folder: Path, model):
        import faiss

        self.folder = Path(folder)
        manifest, self.spec = check_encodings(folder, model)
        self.extractor, self.root = manifest["extractor"], keys_folder(folder, model)
        record = read_json(self.root / COLLECTION)
        shards = _shards(manifest)
        if record.get("shards") != [{"path": e["path"], "sha256": e.get("sha256")} for e in shards]:
            raise StaleKeys(f"{self.root / COLLECTION}: made from other shards than the manifest lists")
        self.shards = [confined(self.folder, e["path"], str(self.folder / "manifest.json")) for e in shards]
        for path, entry in zip(self.shards, shards, strict=True):  # cheap: sizes; each read checks its crc32
            if "bytes" in entry and (not path.is_file() or path.stat().st_size != entry["bytes"]):
                raise UserError(f"{path}: missing or changed since the index was made (listed in "
                                f"{self.folder / 'manifest.json'}); rebuild the index")
        self.skipped = list(manifest.get("skipped", [])) + objects(record, "skipped", str(self.root / COLLECTION),
                                                                   default=[])
        files = record.get("files")
        for name in (*SMALL, *LARGE):  # what merge_keys wrote, unchanged since
            path, made = self.root / name, files.get(name) if isinstance(files, dict) else None
            if not isinstance(made, dict) or not path.is_file() or path.stat().st_size != made.get("bytes") or (
                    name in SMALL and sha256_of(path) != made.get("sha256")):
                raise UserError(f"{path}: missing or not what {COLLECTION} recorded; rebuild the index "
                                "('vmr index' again)")
        videos, frames = record.get("videos"), record.get("frames")
        self.ids = read_json(self.root / "ids.json", list)
        if not isinstance(videos, int) or len(self.ids) != videos or not all(isinstance(i, str) for i in self.ids):
            raise UserError(f"{self.root / 'ids.json'}: does not list the {videos} videos of {COLLECTION}")
        self.table = read_npy(self.root / "table.npy", "i", (videos, COLUMNS))
        self.durations = read_npy(self.root / "durations.npy", "f", (videos,))
        self.frame_video = read_npy(self.root / "frames.npy", "i", (frames,), mmap=True)
        self.keys = read_npy(self.root / "keys.npy", "f", (frames, model.config.corpus.key_dim), mmap=True)
        if (self.table[:, 0] >= len(shards)).any() or (self.table < 0).any() or not np.isfinite(self.durations).all():
            raise UserError(f"{self.root / 'table.npy'}: names shards or byte ranges the index does not have")
        try:
            self.ann = faiss.read_index(str(self.root / "ann.faiss"))
        except RuntimeError as error:
            raise UserError(f"{self.root / 'ann.faiss'}: not a readable FAISS index ({first_line(error, 120)}); "
                            "rebuild the index") from None
        if self.ann.ntotal != frames or self.ann.d != self.keys.shape[1]:
            raise UserError(f"{self.root / 'ann.faiss'}: holds {self.ann.ntotal} keys of {self.ann.d}, "
                            f"not the {frames} of {COLLECTION}; rebuild the index")
        if hasattr(self.ann, "nprobe"):
            self.ann.nprobe = NPROBE
        self.ann = _on_gpu(self.ann)

    @classmethod
    def open(cls, folder: Path, model, progress: bool = False) -> Collection:
        check_corpus_model(model.config, str(folder))
        root = keys_folder(folder, model)
        try:
            return cls(folder, model)
        except (StaleKeys, UserError) as error:
            if (root / COLLECTION).is_file() and not isinstance(error, StaleKeys):
                raise
        build_keys(Path(folder), model, progress=progress)  # missing or stale: made now, kept for next time
        merge_keys(Path(folder), model)
        return cls(folder, model)

    def __len__(self) -> int:
        return len(self.ids)

    def shortlist(self, query_key: np.ndarray, count: int) -> list[tuple[int, float]]:
        """(video, score) of the ``count`` best videos by their best frame's key score."""
        query = np.ascontiguousarray(query_key, dtype=np.float32).reshape(1, -1)
        count = min(count, len(self.ids))
        frames = min(len(self.keys), count * FRAMES_PER_VIDEO)
        while True:
            _, found = self.ann.search(query, frames)
            found = found[0][found[0] >= 0]
            order = np.sort(found)  # rescored exactly from the keys on disk, read in file order
            exact = self.keys[order].astype(np.float32) @ query[0]
            ranked = np.argsort(-exact, kind="stable")
            videos = self.frame_video[order][ranked]
            if not np.isfinite(exact).all() or (videos < 0).any() or (videos >= len(self.ids)).any():
                raise UserError(f"{self.root}: keys.npy or frames.npy hold values no index writes; rebuild the index")
            _, first = np.unique(videos, return_index=True)  # each video at its best frame
            best = sorted(first)[:count]
            if len(best) >= count or frames >= len(self.keys):
                return [(int(videos[i]), float(exact[ranked][i])) for i in best]
            frames = min(len(self.keys), frames * 4)

    def load(self, video: int) -> EncodedVideo:
        """One video's tokens and times, read from its shard at the recorded byte ranges and checked."""
        from vmr.data.decode import _array

        shard, *ranges = (int(v) for v in self.table[video])
        path = self.shards[shard]
        arrays = []
        with open(path, "rb") as f:
            for (offset, size, crc), name in ((ranges[:3], TOKENS), (ranges[3:], TIMES)):
                f.seek(offset)
                data = f.read(size)
                if len(data) != size or zlib.crc32(data) != crc:
                    raise UserError(f"{path}: the {name} of {self.ids[video]!r} changed since the index was made; "
                                    "rebuild the index")
                arrays.append(_array(data, name))
        try:
            return encoded(self.ids[video], float(self.durations[video]), *arrays, self.spec, self.extractor)
        except ValueError as error:
            raise UserError(f"{path}: {self.ids[video]!r}: {first_line(error)}") from None


class StaleKeys(UserError):
    """The merged keys were made from other shards than the manifest lists now."""


def _on_gpu(index):
    """The index on the GPU when FAISS was built with GPU support and one is present (faiss-cpu: never)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
