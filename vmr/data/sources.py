"""Where the stream's samples come from, and how failures are counted.

Shard lists (paths, folders, globs, brace patterns, http(s) URLs, ``pipe:`` commands when allowed),
bounded downloads (curl with time limits), the number of videos a manifest promises, the rank of
this process, and the shared counter of unreadable shards and samples with its guard against a
stream of nothing but failures.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import torch

from vmr.errors import UserError


def expand_shards(spec: str | list[str], allow_pipe: bool = False) -> list[str]:
    """Shard URLs from paths, folders (every .tar inside), globs, brace patterns
    (``train-{000000..000099}.tar``), ``http(s)://`` URLs and, with ``allow_pipe``
    (``data.allow_pipe``), ``pipe:COMMAND``, which runs COMMAND in a shell."""
    import braceexpand

    urls: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        for pattern in braceexpand.braceexpand(item):
            if pattern.startswith("pipe:") and not allow_pipe:
                raise UserError(f"shards: {pattern[:80]!r} runs a shell command; set data.allow_pipe=true "
                                "to allow pipe: URLs (only for commands you wrote yourself)")
            if pattern.startswith("pipe:") or "://" in pattern:
                urls.append(pattern)
            elif Path(pattern).is_dir():
                urls += _committed(sorted(str(p) for p in Path(pattern).glob("*.tar")))
            elif any(c in pattern for c in "*?["):
                urls += _committed(sorted(glob.glob(pattern)))
            elif Path(pattern).is_file():
                urls.append(pattern)
            else:
                raise UserError(f"shards: {pattern} does not exist")
    if not urls:
        raise UserError(f"shards: no shard matches {spec!r}")
    return urls


def _listed(folder: Path, seen: dict) -> dict[str, dict] | None:
    """The shard entries of ``folder``'s manifest by file name (read once per ``seen``), or None
    when the folder has no manifest."""
    from vmr.data.manifest import MANIFEST, read_manifest

    if folder not in seen:
        seen[folder] = {s["path"]: s for info in read_manifest(folder)["splits"].values() for s in info["shards"]} \
            if (folder / MANIFEST).is_file() else None
    return seen[folder]


def _committed(paths: list[str]) -> list[str]:
    """Of the shards a folder or glob matched, those a manifest beside them lists: a part being
    built or a merge not yet committed writes shards that belong to no split yet (and may duplicate
    the committed split's videos). Folders without a manifest: every match."""
    seen: dict = {}
    kept = [str(path) for path in map(Path, paths)
            if (names := _listed(path.parent, seen)) is None or path.name in names]
    if len(kept) < len(paths):
        print(f"note: {len(paths) - len(kept)} shard(s) matched but not listed in their folder's manifest.json "
              "(a build or merge in progress) are not read", file=sys.stderr)
    return kept


# curl's waits, bounded in total: connect within 10 s, then fail if fewer than 1 kB/s arrive for
# 60 s; a retry starts only within the first 60 s (a refused connection is retried, a silent server
# is not waited for twice), so one shard costs at most about 70 s before it is reported.
# (webdataset's own curl command retries for a minute and can wait forever on a stalled server.)
CURL = ["curl", "--connect-timeout", "10", "--speed-limit", "1024", "--speed-time", "60", "--retry", "2",
        "--retry-delay", "1", "--retry-max-time", "60", "-f", "-s", "-S", "-L"]


def open_url(url: str, mode: str = "rb", bufsize: int = 8192):
    """Open an http(s) shard through curl with bounded waits (a webdataset gopen scheme)."""
    from webdataset.gopen import Pipe

    if mode[0] != "r":
        raise ValueError(f"{url}: shards are only read here")
    return Pipe([*CURL, url], mode=mode, bufsize=bufsize, ignore_status=[141, 23], timeout=300.0)


def bounded_downloads() -> None:
    """Every webdataset read of an http(s) URL in this process (and the workers it forks) goes
    through ``open_url``: a server that accepts and never sends stops the read within a minute
    instead of hanging it. Called by every reader of shard URLs (the loader, feature extraction)."""
    from webdataset.gopen import gopen_schemes

    gopen_schemes["http"] = gopen_schemes["https"] = open_url


def count_samples(urls: list[str], key: str = "samples") -> int | None:
    """Videos (or with ``key`` "queries", queries) in these shards according to the manifests beside
    them; None when unknown."""
    total, seen = 0, {}
    for url in urls:
        path = Path(url)
        entry = (_listed(path.parent, seen) or {}).get(path.name) if path.is_file() else None
        if entry is None:
            return None
        total += entry[key]
    return total


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed or the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamError(UserError):
    """The stream cannot go on (nothing but unreadable shards or samples). Raised in a DataLoader
    worker, re-raised in the main process with the worker's traceback glued to the message: the
    constructor keeps only the reason, so the user sees one line."""

    def __init__(self, message: str):
        super().__init__(message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip())


class SkipCounter:
    """Samples (and shards) skipped as unreadable, summed over the DataLoader's worker processes,
    with each worker's latest reason. One slot per worker in shared memory: each worker writes only
    its own slot, so no locking."""

    REASON_BYTES = 300

    def __init__(self, workers: int):
        self.slots = torch.zeros(max(1, workers), dtype=torch.int64).share_memory_()
        self.reasons = torch.zeros(max(1, workers), self.REASON_BYTES, dtype=torch.uint8).share_memory_()

    def add(self, worker: int, reason: str = "") -> None:
        self.slots[worker] += 1
        data = reason.encode(errors="replace")[: self.REASON_BYTES]
        self.reasons[worker].zero_()
        self.reasons[worker, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else 0

    @property
    def total(self) -> int:
        return int(self.slots.sum())

    @property
    def last_reason(self) -> str:
        """The latest reason of the first worker that has one ("" when nothing was skipped)."""
        for row in self.reasons:
            text = bytes(row.tolist()).rstrip(b"\0").decode(errors="replace")
            if text:
                return text
        return ""


MAX_FAILURES_IN_A_ROW = 50


class FailureGuard:
    """One worker's view of failures: each unreadable shard or sample counts once in the shared
    counter; a long run of them with no good sample in between stops the stream with the last
    reason, since an endless training stream of nothing but bad input would otherwise spin forever."""

    def __init__(self, counter: SkipCounter, worker: int):
        self.counter, self.worker, self.in_a_row = counter, worker, 0

    def failed(self, where: str, error: BaseException) -> None:
        first = str(error.args[0]) if error.args else ""
        text = first.strip().splitlines()[0][:200] if first.strip() else type(error).__name__
        reason = f"{where}: {text}"
        self.counter.add(self.worker, reason)
        self.in_a_row += 1
        if self.in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise StreamError(f"{self.in_a_row} shards or samples in a row could not be read; last: {reason}")

    def succeeded(self) -> None:
        self.in_a_row = 0

    def tar_handler(self, error: BaseException) -> bool:
        """webdataset handler for a shard or tar member that cannot be read: count it, go on."""
        # webdataset appends the shard's URL to the exception's arguments.
        url = error.args[-1] if len(error.args) > 1 and isinstance(error.args[-1], str) else "a shard"
        self.failed(url, error)
        return True
