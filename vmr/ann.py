"""A collection's compact keys on disk and their approximate-nearest-neighbour index: what lets
``vmr search`` outgrow memory.

A model trained with ``model.corpus`` gives every frame a compact key (``key_dim`` numbers) and every
sentence a key; a video's score for a sentence is its best frame's dot product (vmr/model/corpus.py).
An index folder (``vmr index``) holds, beside its feature shards, ``keys/<model>/`` (``<model>``: a
fingerprint of the weights the keys depend on, so another model's keys never mix in):

  ``NNNNNN.npy`` + ``NNNNNN.json``  one part per feature shard: the float16 keys of its frames, and
      its videos (id, duration, frames, where its tokens and times lie in the tar, their crc32). Made
      in parts over processes and resumed: a part whose shard's sha256 is the manifest's is kept.
  the merged collection: ``keys.npy`` (float16, every frame, a video's frames together),
      ``starts.npy`` (each video's first row of keys.npy, and the total), ``table.npy`` (each video's
      shard and byte ranges), ``durations.npy``, ``ids.json``, ``segments.npy`` (each ANN key's video)
      ``prepared.npy`` and ``prepared_rows.npy``, the rerank's sentence-free half (vmr/prepared.py);
      and ``ann.faiss``: FAISS over *segment keys*, the mean of SEGMENT consecutive frame keys of a
      video (8x fewer keys than frames: exact inner product up to FLAT_MAX of them, IVF-PQ beyond, on
      the GPU where FAISS has one); and ``collection.json``, written last: a collection is whole or absent.

A search asks the ANN index for the best segments until it has RESCORED videos (or 5 per video
wanted), scores each of those exactly by its best frame (its rows of ``keys.npy``, memory-mapped: only
those are read), keeps the best ``count``; the rerank reads only their prepared rows (``prepared_windows``).
Memory is the ANN index's (flat: 4 x key_dim bytes per segment; IVF-PQ: 16 bytes and an id) and the
per-video table's, not the tokens'. Why segments: a query's best frames lie in a few videos whose
neighbouring frames score alike, and one segment key stands for them; over frames, an IVF index had to
visit a quarter of its lists to keep 94% of the exact top 20 (vmr bench search's report).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from vmr.data.tars import TIMES, TOKENS, sha256_of
from vmr.encode import EncodedVideo, check_encodings, check_times, encoded, sample_video
from vmr.errors import UserError
from vmr.io import confined, first_line, json_text, objects, read_json, read_npy, save_npy, write_text_atomic
from vmr.prepared import merge_parts, prepare_video, read_rows, row_shape
from vmr.prepared import windows as stored_windows

KEYS = "keys"
COLLECTION = "collection.json"
FORMAT = 3  # of the merged files; a collection of another format is merged again from its parts
SEGMENT = 8  # consecutive frames per ANN key
FLAT_MAX = 1_000_000  # segment keys searched exactly (about 20 ms on 2 cores); beyond, IVF-PQ
NPROBE = 256  # IVF lists a query visits (of at most MAX_LISTS)
MAX_LISTS = 2048
RESCORED = 100  # videos scored exactly by every frame per search (5 per video wanted when more)
SMALL = ("ids.json", "table.npy", "durations.npy", "starts.npy", "prepared_rows.npy")  # checked by sha256 when opened: bytes per video
LARGE = ("keys.npy", "segments.npy", "ann.faiss", "prepared.npy")  # by size (each row read is checked when used)
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
    """Of the weights a frame's key and its prepared rows depend on (the projections, the pooling, the keys)."""
    digest = hashlib.sha256()
    for module in (model.head.frame_in, model.head.keys, model.head.patch_in, model.head.pool):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def keys_folder(folder: Path, model) -> Path:
    return Path(folder) / KEYS / fingerprint(model)


def _shards(manifest: dict) -> list[dict]:
    return [entry for split in manifest["splits"].values() for entry in split["shards"]]


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
        if record.is_file() and (out / f"{n:06d}.npy").is_file() and (out / f"{n:06d}.prepared.npy").is_file():
            old = read_json(record)
            if old.get("sha256") == entry.get("sha256") and old.get("shard") == entry["path"]:
                continue
        shard = confined(Path(folder), entry["path"], str(Path(folder) / "manifest.json"))
        videos, keys, prepared, skipped = [], [], [], []
        with torch.no_grad():
            for video, ranges in _samples(shard, spec, manifest["extractor"], skipped):
                frames = video.tokens[None, :, :1].to(model.head.frame_in.weight.device)
                mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
                keys.append(model.head.frame_keys(frames, mask)[0].cpu().numpy().astype(np.float16))
                prepared.append(prepare_video(model, video))
                videos.append({"id": video.video_id, "duration": video.duration, "frames": len(video.times),
                               "rows": len(prepared[-1]), "ranges": ranges})
        width = model.config.corpus.key_dim
        save_npy(out / f"{n:06d}.npy", np.concatenate(keys) if keys else np.zeros((0, width), np.float16))
        save_npy(out / f"{n:06d}.prepared.npy", np.concatenate(prepared) if prepared
                  else np.zeros((0, *row_shape(model, manifest["extractor"])), np.float16))
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
    manifest, _ = check_encodings(folder, model)
    out = keys_folder(folder, model)
    shards = _shards(manifest)
    keys, ids, durations, table, frames, rows, skipped = [], [], [], [], [], [], []
    shape = row_shape(model, manifest["extractor"])
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
        prepared = read_rows(out / f"{n:06d}.prepared.npy", shape)
        if sum(v["frames"] for v in videos) != len(part) or sum(v["rows"] for v in videos) != len(prepared):
            raise UserError(f"{record_path}: its videos do not account for the {len(part)} keys and {len(prepared)} "
                            "prepared rows beside it; run 'vmr index' again")
        skipped += objects(record, "skipped", str(record_path), default=[])
        for video in videos:
            frames.append(video["frames"])
            rows.append(video["rows"])
            ids.append(video["id"])
            durations.append(video["duration"])
            table.append([n, *video["ranges"]])
        keys.append(part)
    if not ids:
        raise UserError(f"{folder}: holds no readable video")
    starts = np.concatenate([[0], np.cumsum(frames)]).astype(np.int64)
    merge_parts([out / f"{n:06d}.prepared.npy" for n in range(len(shards))], out / "prepared.npy", shape)
    first = np.concatenate([[0], np.cumsum(rows)[:-1]])
    return write_collection(out, np.concatenate(keys).astype(np.float16), starts, np.asarray(table, dtype=np.int64),
                            np.asarray(durations, dtype=np.float64), np.stack([first, rows], axis=1).astype(np.int64),
                            ids, skipped,
                            [{"path": e["path"], "sha256": e.get("sha256")} for e in shards])


def write_collection(out: Path, keys: np.ndarray, starts: np.ndarray, table: np.ndarray, durations: np.ndarray,
                     prepared_rows: np.ndarray, ids: list[str], skipped: list, shards: list[dict]) -> dict:
    """The merged collection's files (module docstring) from every frame's float16 ``keys`` (video by
    video), each video's first row ``starts`` (and the total), ``table``, ``durations``, each video's
    (first row, rows) of ``prepared.npy`` (already written) and ``ids``; ``collection.json`` last.
    Returns that record."""
    import faiss

    save_npy(out / "keys.npy", keys)
    save_npy(out / "starts.npy", starts)
    save_npy(out / "table.npy", table.reshape(-1, COLUMNS))
    save_npy(out / "durations.npy", durations)
    save_npy(out / "prepared_rows.npy", prepared_rows.reshape(-1, 2))
    write_text_atomic(out / "ids.json", json_text(ids, out / "ids.json") + "\n")
    segments, segment_video = segment_keys(keys, starts)
    save_npy(out / "segments.npy", segment_video)
    index, kind = ann_index(segments)
    del segments
    faiss.write_index(index, str(out / "ann.faiss.partial"))
    os.replace(out / "ann.faiss.partial", out / "ann.faiss")
    record = {"format": FORMAT, "fingerprint": out.name, "kind": kind, "videos": len(ids), "frames": len(keys),
              "segments": len(segment_video), "key_dim": keys.shape[1], "files": {
                  name: {"bytes": (out / name).stat().st_size,
                         **({"sha256": sha256_of(out / name)} if name in SMALL else {})} for name in (*SMALL, *LARGE)},
              "skipped": skipped, "shards": shards}
    write_text_atomic(out / COLLECTION, json_text(record, out / COLLECTION, indent=1) + "\n")
    return record


def segment_keys(keys: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 unit keys, int32 video of each): the mean of every SEGMENT consecutive frame keys of
    each video (its last segment may be shorter), a slice of videos at a time (memory: one slice in
    float32, not every key)."""
    counts = np.diff(starts)
    per_video = -(-counts // SEGMENT)  # segments of each video
    video = np.repeat(np.arange(len(counts), dtype=np.int32), per_video)
    first = np.repeat(starts[:-1], per_video) + SEGMENT * (np.arange(len(video)) - np.repeat(
        np.cumsum(per_video) - per_video, per_video))  # each segment's first row
    out = np.empty((len(video), keys.shape[1]), dtype=np.float32)
    step = 1 << 16
    for lo in range(0, len(video), step):
        bounds = first[lo:lo + step]
        end = first[lo + step] if lo + step < len(first) else len(keys)
        sums = np.add.reduceat(np.asarray(keys[bounds[0]:end], dtype=np.float32), bounds - bounds[0], axis=0)
        out[lo:lo + step] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return out, video


def _part_video(video: dict, where: str) -> dict:
    """One video of a key part, checked field by field (what build_keys wrote)."""
    import math

    duration, frames, ranges, rows = video.get("duration"), video.get("frames"), video.get("ranges"), video.get("rows")
    if not isinstance(video.get("id"), str) or not video["id"]:
        raise UserError(f"{where}: 'id' must be a video id; run 'vmr index' again")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
            or duration <= 0:
        raise UserError(f"{where}: 'duration' must be a positive number; run 'vmr index' again")
    for name, value in (("frames", frames), ("rows", rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: {name!r} must be a positive integer; run 'vmr index' again")
    if not isinstance(ranges, list) or len(ranges) != COLUMNS - 1 or any(
            isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 2**63 for r in ranges):
        raise UserError(f"{where}: 'ranges' must be {COLUMNS - 1} byte offsets, sizes and checksums; "
                        "run 'vmr index' again")
    return video


def ann_index(keys: np.ndarray):
    """(FAISS index over unit ``keys``, its kind): exact inner product up to FLAT_MAX keys; beyond,
    IVF with about 4 sqrt(n) lists, at most MAX_LISTS (k-means on 2 cores stays within seconds),
    trained on 40 keys per list (FAISS asks for 39), and 16-byte product codes. The IVF index is by
    L2 distance, the same order as inner product on unit keys, and its lists are found better so
    (the report: recall 0.86 against 0.78 by inner product, 256 of 2,048 lists visited)."""
    import faiss

    vectors = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = vectors.shape
    if n <= FLAT_MAX:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, "flat"
    lists = max(1, min(MAX_LISTS, int(4 * n ** 0.5), n // 40))
    codes = 16 if d % 16 == 0 else next(m for m in (8, 4, 2, 1) if d % m == 0)
    index = faiss.index_factory(d, f"IVF{lists},PQ{codes}", faiss.METRIC_L2)
    index.do_polysemous_training = False  # its codes' reordering serves a search mode not used here; 20 s a build
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
        if record.get("format") != FORMAT:
            raise StaleKeys(f"{self.root / COLLECTION}: of another format than this version merges")
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
        videos, frames, segments = record.get("videos"), record.get("frames"), record.get("segments")
        self.ids = read_json(self.root / "ids.json", list)
        if not isinstance(videos, int) or len(self.ids) != videos or not all(isinstance(i, str) for i in self.ids):
            raise UserError(f"{self.root / 'ids.json'}: does not list the {videos} videos of {COLLECTION}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in (frames, segments)):
            raise UserError(f"{self.root / COLLECTION}: 'frames' and 'segments' must be positive integers; "
                            "rebuild the index")
        self.table = read_npy(self.root / "table.npy", "i", (videos, COLUMNS))
        self.durations = read_npy(self.root / "durations.npy", "f", (videos,))
        self.starts = read_npy(self.root / "starts.npy", "i", (videos + 1,))
        self.segment_video = read_npy(self.root / "segments.npy", "i", (segments,), mmap=True)
        self.keys = read_npy(self.root / "keys.npy", "f", (frames, model.config.corpus.key_dim), mmap=True)
        self.prepared = read_rows(self.root / "prepared.npy", row_shape(model, self.extractor))
        self.prepared_rows = read_npy(self.root / "prepared_rows.npy", "i", (videos, 2))
        if (self.table[:, 0] >= len(shards)).any() or (self.table < 0).any() or not np.isfinite(self.durations).all():
            raise UserError(f"{self.root / 'table.npy'}: names shards or byte ranges the index does not have")
        if (self.prepared_rows[:, 1] < 1).any() or (self.prepared_rows[:, 0] < 0).any() \
                or (self.prepared_rows.sum(axis=1) > len(self.prepared)).any():
            raise UserError(f"{self.root / 'prepared_rows.npy'}: names rows {self.root / 'prepared.npy'} does not have; "
                            "rebuild the index")
        if self.starts[0] != 0 or self.starts[-1] != frames or (np.diff(self.starts) < 1).any():
            raise UserError(f"{self.root / 'starts.npy'}: does not divide the {frames} keys among the {videos} videos; "
                            "rebuild the index")
        try:
            self.ann = faiss.read_index(str(self.root / "ann.faiss"))
        except RuntimeError as error:
            raise UserError(f"{self.root / 'ann.faiss'}: not a readable FAISS index ({first_line(error, 120)}); "
                            "rebuild the index") from None
        if self.ann.ntotal != segments or self.ann.d != self.keys.shape[1]:
            raise UserError(f"{self.root / 'ann.faiss'}: holds {self.ann.ntotal} keys of {self.ann.d}, "
                            f"not the {segments} segment keys of {COLLECTION}; rebuild the index")
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
        """(video, score) of the ``count`` best videos by their best frame's key score: the ANN index's
        best segments name the videos to score (RESCORED, or 5 per video wanted), every frame of each
        is scored exactly."""
        query = np.ascontiguousarray(query_key, dtype=np.float32).reshape(1, -1)
        count = min(count, len(self.ids))
        wanted = min(len(self.ids), max(RESCORED, 5 * count))
        asked = min(self.ann.ntotal, 16 * wanted)  # a flat search costs the same for any count
        while True:
            _, found = self.ann.search(query, asked)
            ranked = np.asarray(self.segment_video[found[0][found[0] >= 0]])  # each segment's video, best first
            if (ranked < 0).any() or (ranked >= len(self.ids)).any():
                raise UserError(f"{self.root / 'segments.npy'}: names videos the index does not have; rebuild the index")
            _, first = np.unique(ranked, return_index=True)
            if len(first) >= wanted or asked >= self.ann.ntotal:
                break
            asked = min(self.ann.ntotal, asked * 4)
        picked = ranked[np.sort(first)][:wanted]
        scored = []
        for video in sorted(picked):  # file order
            rows = self.keys[self.starts[video]:self.starts[video + 1]].astype(np.float32)
            scored.append((float((rows @ query[0]).max()), video))
        if not all(np.isfinite(score) for score, _ in scored):
            raise UserError(f"{self.root / 'keys.npy'}: holds values no index writes; rebuild the index")
        scored.sort(key=lambda sv: (-sv[0], sv[1]))
        return [(int(video), score) for score, video in scored[:count]]

    def prepared_windows(self, video: int):
        """One video's windows as the rerank takes them, from its prepared rows (vmr/prepared.py) and its
        frame times (read from its shard and checked)."""
        first, rows = (int(v) for v in self.prepared_rows[video])
        times, duration = self._arrays(video, (TIMES,))[0], float(self.durations[video])
        try:
            check_times(times, duration)
        except ValueError as error:
            raise UserError(f"{self.shards[int(self.table[video][0])]}: {self.ids[video]!r}: {first_line(error)}") from None
        return stored_windows(self.prepared[first:first + rows], times.tolist(), duration, self.spec,
                              f"{self.root / 'prepared.npy'} ({self.ids[video]!r})")

    def load(self, video: int) -> EncodedVideo:
        """One video's tokens and times, read from its shard at the recorded byte ranges and checked."""
        path = self.shards[int(self.table[video][0])]
        arrays = self._arrays(video, (TOKENS, TIMES))
        try:
            return encoded(self.ids[video], float(self.durations[video]), *arrays, self.spec, self.extractor)
        except ValueError as error:
            raise UserError(f"{path}: {self.ids[video]!r}: {first_line(error)}") from None

    def _arrays(self, video: int, names: tuple[str, ...]) -> list:
        """Some of a video's arrays (TOKENS, TIMES), read from its shard at the recorded byte ranges, checked."""
        from vmr.data.decode import _array

        shard, *ranges = (int(v) for v in self.table[video])
        path = self.shards[shard]
        arrays = []
        with open(path, "rb") as f:
            for (offset, size, crc), name in ((ranges[:3], TOKENS), (ranges[3:], TIMES)):
                if name not in names:
                    continue
                f.seek(offset)
                data = f.read(size)
                if len(data) != size or zlib.crc32(data) != crc:
                    raise UserError(f"{path}: the {name} of {self.ids[video]!r} changed since the index was made; "
                                    "rebuild the index")
                arrays.append(_array(data, name))
        return arrays


class StaleKeys(UserError):
    """The merged keys were made from other shards than the manifest lists now."""


def _on_gpu(index):
    """The index on the GPU when FAISS was built with GPU support and one is present (faiss-cpu: never)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
