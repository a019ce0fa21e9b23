"""Safe reading and writing of the files vmr is given and makes.

Reading: one reader per kind of file (text, JSON, npz) that turns every decode, type and shape
error into a one-line UserError naming the file and, where there is one, the key. Names read from
files (video ids, journal and manifest entries) go through ``confined``: never outside their folder.

Writing: ``json_text`` (JSON without a NaN or an infinity in it), ``write_text_atomic`` (a file
appears complete or not at all), ``write_output`` (a single file a user names: it replaces only an
earlier one of its kind), and ``FolderLock``: one writer of a folder at a time, the holder's pid and
host in the lock file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

from vmr.errors import UserError, out_of_space


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line (its type when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


# ----- reading --------------------------------------------------------------------------------------


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a binary file is refused by name."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None


def read_json(path: str | Path, expect: type = dict):
    """A JSON file whose top level is an ``expect`` (dict or list)."""
    try:
        value = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path}: not valid JSON ({first_line(error, 120)})") from None
    if not isinstance(value, expect):
        raise UserError(f"{path}: expected a JSON {'object' if expect is dict else 'list'}, "
                        f"got {type(value).__name__}")
    return value


def field(mapping: dict, key: str, kind: type | tuple, where: str, default=...):
    """``mapping[key]`` checked to be a ``kind`` (bool is not a number); ``where`` names the file."""
    if key not in mapping:
        if default is not ...:
            return default
        raise UserError(f"{where}: '{key}' is missing")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise UserError(f"{where}: '{key}' must be {names}, got {json.dumps(value)[:60] if _jsonable(value) else value!r}")
    return value


def objects(mapping: dict, key: str, where: str, default=...) -> list[dict]:
    """``mapping[key]`` checked to be a list of JSON objects (skip lists, shard lists): a reader
    that then takes ``entry.get(...)`` of each never meets a number or a string."""
    values = field(mapping, key, list, where, default)
    for number, value in enumerate(values):
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{key}[{number}]' must be an object, got {json.dumps(value)[:60] if _jsonable(value) else value!r}")
    return values


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def read_npz(path: Path, keys: tuple[str, ...]):
    """The first of ``keys`` in an .npz file, as finite float32; no pickles."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in keys if k in data.files), None)
            if key is None:
                raise UserError(f"{path}: holds {', '.join(data.files) or 'no array'}, expected {' or '.join(keys)}")
            array = np.asarray(data[key])
    except UserError:
        raise
    except Exception as error:  # zipfile, pickle refusal, truncated members: numpy's many types
        raise UserError(f"{path}: not a readable .npz file ({first_line(error, 120)})") from None
    if array.dtype.kind not in "fiu" or array.size == 0:
        raise UserError(f"{path}: '{key}' must be a non-empty array of numbers, got {array.dtype} {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise UserError(f"{path}: '{key}' holds NaN or infinite values")
    return array


def save_npy(path: Path, array) -> None:
    """A .npy file written under another name and renamed: whole or absent."""
    import numpy as np

    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.save(f, array)
    os.replace(partial, path)


def read_npy(path: Path, kind: str, shape: tuple, mmap: bool = False):
    """A .npy file of numbers of ``kind`` (numpy kinds, e.g. "f" or "iu") and ``shape`` (None: any
    length), or a one-line UserError naming it (the files of a collection index: 'vmr index' rebuilds them)."""
    import numpy as np

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


def confined(folder: Path, name, where: str) -> Path:
    """``folder / name`` for a plain file name read from a file (an id, a journal entry): anything
    that would lead elsewhere (a path separator, '..', an absolute path) is refused."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"{where}: {json.dumps(name)[:80] if _jsonable(name) else name!r} is not a plain file name "
                        f"inside {folder}")
    return folder / name


# ----- writing --------------------------------------------------------------------------------------


def _key_path(path: str, key) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


def json_text(value, where, indent: int | None = None) -> str:
    """THE way vmr turns what it writes (manifests, records, predictions, metrics, printed results)
    into JSON: never a NaN or an infinity, which is not JSON and no reader can use; one is a UserError
    naming ``where`` (the file or output) and the key."""
    absent = absent_when_not_finite(value)[1]
    if absent:
        raise UserError(f"{where}: not written: {absent[0] or 'the value'} is not a finite number")
    return json.dumps(value, indent=indent, allow_nan=False)


def absent_when_not_finite(value, path: str = ""):
    """``value`` with every NaN or infinite float replaced by None (absent), and the key paths
    replaced: for reports where a number can be missing (a metric over no ground truth)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path]
    if isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        out, paths = {}, []
        for key, item in items:
            out[key], found = absent_when_not_finite(item, _key_path(path, key))
            paths += found
        return (type(value)(out) if isinstance(value, dict) else list(out.values())), paths
    return value, []


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden temporary file beside ``path``, then rename: readers never see half a file.
    A full disk or an unwritable place is a UserError naming it, and leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        full = out_of_space(error, path)
        raise (full or UserError(f"{path}: cannot write it ({error.strerror or error})")) from None


def check_output(path: Path, what: str, ours) -> None:
    """May a single output file a user names (a prediction file, a metrics JSON, a report) be written
    at ``path``? Only where nothing is, an empty file, or an earlier ``what``: JSON (for JSON lines,
    its first row) that ``ours(value)`` accepts. A slip of the hand (``--out`` on the query file,
    ``--json`` on the predictions) is refused in one line and loses nothing. Called before the work
    and again by ``write_output``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: cannot write it (a folder; name the {what} to write)")
    if path.is_file() and path.stat().st_size:
        value = None
        with contextlib.suppress(OSError, UnicodeDecodeError, ValueError, RecursionError):
            with path.open("rb") as handle:
                start = handle.read(1 << 16)
                # Anything but JSON is refused without reading it all (a video named by mistake).
                if start.lstrip()[:1] in (b"{", b"["):
                    there = (start + handle.read()).decode("utf-8")
                    try:
                        value = json.loads(there)
                    except ValueError:  # JSON lines: the first row
                        value = json.loads(next(line for line in there.splitlines() if line.strip()))
        if not ours(value):
            raise UserError(f"{path}: exists and is not a {what} that vmr wrote; vmr replaces only its own: "
                            "name another file, or remove this one")


def write_output(path: Path, text: str, what: str, ours) -> None:
    """``write_text_atomic`` of a single output file, where ``check_output`` allows it."""
    check_output(path, what, ours)
    write_text_atomic(Path(path), text)


LOCK = ".vmr-lock"


class LockBusy(UserError):
    """Another run holds the lock (``FolderLock``) and did not let go in time."""


class FolderLock:
    """One writer of ``folder`` at a time (shards, feature shards). The lock file holds the holder's
    pid, host and command; a second writer waits up to ``wait_s`` for it, then stops with one line
    naming the holder. A lock whose holder no longer runs on this host is taken over (a killed
    run). The ranks of one launch share their main rank's lock."""

    def __init__(self, folder: Path, what: str, wait_s: float = 10.0, name: str = LOCK):
        """``name``: the lock file; writers of disjoint parts of a folder (a part of a split) take
        their own, so that they run side by side."""
        self.path, self.what, self.wait_s, self.held = Path(folder) / name, what, wait_s, False

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3])[:200],
              "what": self.what}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # a stale lock: its process is gone
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                if time.monotonic() >= deadline:
                    raise LockBusy(f"{self.path.parent}: another run writes here ({holder.get('what', '?')} by pid "
                                    f"{holder.get('pid')} on {holder.get('host')}, waited {self.wait_s:g} s); "
                                    f"wait for it to finish, or remove {self.path} if it is gone") from None
                time.sleep(0.2)
                continue
            except OSError as error:
                raise UserError(f"{self.path.parent}: cannot write there ({error.strerror or error})") from None
            with os.fdopen(fd, "w") as file:
                json.dump(me, file)
            self.held = True
            return self

    def _holder(self) -> dict | None:
        """The holder's record, or None when it is stale (its pid is gone from this host)."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written right now, or garbage: give it a moment
            return {"pid": "?", "host": "?"}
        if not isinstance(holder, dict):
            return {"pid": "?", "host": "?"}
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
        return holder

    def __exit__(self, *exc) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False
