"""Tar shards on disk: the member names of a sample, the one writer, and reading a shard back.

A sample of a **video shard** is ``<key>.json`` plus ``<key>.mp4`` (vmr/data/shards.py); a sample of
a **feature shard** is the same json plus the arrays below in place of the video (vmr/features.py,
vmr/data/released.py). Every shard is written by ``TarShard``: under a temporary name in its
folder, renamed when complete, so no reader ever sees a truncated shard under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path

from vmr.errors import UserError
from vmr.io import json_text

# Members of a feature shard's sample beside its json (see vmr/features.py for their shapes).
TOKENS, TIMES, TEXT = "tokens.npy", "times.npy", "text.npz"
VIEWS, VIEW_TIMES = "views.npy", "view_times.npy"  # a cache's augmented training views
TAR_MTIME = 0.0  # fixed tar header times: the same inputs give byte-identical shards


def sanitise_key(video_id: str) -> str:
    """A webdataset key: no dots (the first dot starts the extension) and no path characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", video_id) or "video"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


FINGERPRINT_BYTES = 4 << 20  # read from each end of a source file


def fingerprint(path: Path) -> str:
    """What a source file is, cheaply: its name, size and the sha256 of its first and last 4 MiB
    (the whole file when smaller). Resume and reuse compare it, so another video under the same
    name is redone, while an unchanged library is not read in full on every resume."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > 2 * FINGERPRINT_BYTES:
            f.seek(size - FINGERPRINT_BYTES)
        digest.update(f.read(FINGERPRINT_BYTES))
    return f"{path.name}:{size}:{digest.hexdigest()[:32]}"


def shard_damage(folder: Path, shard: dict) -> str | None:
    """What is wrong with a finished shard against its entry (gone, another size, another
    sha256), or None: what a resume or a merge trusts before it skips the work."""
    path = Path(folder) / shard["path"]
    if not path.is_file():
        return "missing"
    if path.stat().st_size != shard["bytes"]:
        return f"{path.stat().st_size} bytes, its record says {shard['bytes']}"
    if sha256_of(path) != shard["sha256"]:
        return "its sha256 differs from its record (changed or damaged)"
    return None


def tar_counts(path: Path) -> tuple[int, int]:
    """(samples, queries) a shard really holds: its distinct keys, and the queries of their json
    members. What a resume checks a record's counts against before it trusts them."""
    import tarfile

    keys, queries = set(), 0
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            keys.add(key)
            if extension == "json":
                meta = json.loads(tar.extractfile(member).read())
                queries += len(meta.get("queries", [])) if isinstance(meta, dict) else 0
    return len(keys), queries


class TarShard:
    """One shard ``folder/name`` written under a temporary name (``.name.tmp-<pid>``); ``close``
    renames it into place and returns ``{"path", "samples", "queries", "bytes", "sha256"}``,
    ``abort`` removes it. A sample is its ``json`` (a dict with ``queries``) plus ``members``
    (extension -> bytes)."""

    def __init__(self, folder: Path, name: str):
        import webdataset as wds

        self.folder, self.name = Path(folder), name
        self.tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, mtime=TAR_MTIME)  # the same inputs give the same bytes
        self.entry = {"path": name, "samples": 0, "queries": 0, "bytes": 0}

    def write(self, key: str, members: dict[str, bytes], meta: dict) -> int:
        """Add one sample; returns its size in bytes (about: tar headers count 2 kB)."""
        self._tar.write({"__key__": key, **members, "json": json_text(meta, f"{key}.json").encode()})
        size = sum(len(data) for data in members.values()) + 2048
        self.entry["samples"] += 1
        self.entry["queries"] += len(meta["queries"])
        self.entry["bytes"] += size
        return size

    def close(self) -> dict:
        self._tar.close()
        self.entry["bytes"], self.entry["sha256"] = self.tmp.stat().st_size, sha256_of(self.tmp)
        os.replace(self.tmp, self.folder / self.name)
        return self.entry

    def abort(self) -> None:
        try:
            self._tar.close()
        except OSError:  # the disk that failed the write fails the flush too (the file closes anyway)
            with contextlib.suppress(OSError):
                self._file.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Numbered shards ``<split>-NNNNNN.tar`` in ``out``, each a ``TarShard``. A new shard starts
    when the next video would pass ``max_bytes`` or the shard holds ``max_videos``."""

    def __init__(self, out: Path, split: str, max_bytes: int, max_videos: int | None):
        self.out, self.split, self.max_bytes, self.max_videos = out, split, max_bytes, max_videos
        self.shards: list[dict] = []
        self._open: TarShard | None = None

    def write(self, key: str, members: dict[str, bytes], meta: dict) -> None:
        size = sum(len(data) for data in members.values()) + 2048
        current = self._open.entry if self._open is not None else None
        if current is not None and current["samples"] > 0 and (
            current["bytes"] + size > self.max_bytes
            or (self.max_videos is not None and current["samples"] >= self.max_videos)
        ):
            self.shards.append(self._open.close())
            self._open = None
        if self._open is None:
            self._open = TarShard(self.out, f"{self.split}-{len(self.shards):06d}.tar")
        self._open.write(key, members, meta)

    def close(self) -> list[dict]:
        if self._open is not None:
            self.shards.append(self._open.close())
            self._open = None
        return self.shards

    def abort(self) -> None:
        if self._open is not None:
            self._open.abort()
            self._open = None


def _finite(array, where: str) -> None:
    import numpy as np

    if array.dtype.kind == "f" and not np.isfinite(array).all():  # float16 overflows to inf too
        raise UserError(f"{where}: not written: it holds NaN or infinite values (the model's outputs are not "
                        "finite: check its bundle's weights and image normalisation)")


def npy_bytes(array, where: str = "an array") -> bytes:
    """A sample member: one array, as ``np.save`` writes it (no pickles); never one holding a NaN
    or an infinity (``where`` names it in the error)."""
    import numpy as np

    _finite(array, where)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(arrays: dict, where: str = "arrays") -> bytes:
    """A sample member: named arrays, as ``np.savez`` writes them; all finite."""
    import numpy as np

    for name, array in arrays.items():
        _finite(array, f"{where}: {name}")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def sweep_temporaries(*folders: Path) -> int:
    """Remove the temporary files (``.*.tmp*``: shards, records) a killed run left in ``folders``
    (call with the folder's lock held, before this run writes); returns how many."""
    swept = 0
    for folder in folders:
        for path in Path(folder).glob(".*.tmp*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                swept += 1
    return swept


def iter_shard(path: Path):
    """(key, video bytes (None in a feature shard), metadata) for each sample of one shard, in order."""
    import webdataset as wds

    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        yield sample["__key__"], sample.get("mp4"), json.loads(sample["json"])
