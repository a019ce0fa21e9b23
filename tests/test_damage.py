"""The damage harness: every kind of file vmr writes, damaged in every way of a family, read by
every command that reads it. Each run must end in exit 2 with one line naming what is wrong, or
exit 0 with the answer the undamaged file gives (or a warning saying what was left out); never a
traceback, a hang, or a NaN in what it prints or writes.

A new kind of file joins by one entry in KINDS (where it lives in the world, its format, the
commands that read it); a new damage by one function in the DAMAGES of its format.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from vmr.bundle import write_bundle
from vmr.cli import main
from vmr.config import load_config

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["data.sampling.size=16", "model.freeze_clip=true"]
LIMIT_S = 120  # a run longer than this is a hang
QUERY = "a red circle"


# ----- the world: one of each kind of folder vmr writes, built once --------------------------------------


@pytest.fixture(scope="module")
def base(synth_dir, shard_dir, tmp_path_factory) -> Path:
    """bundle/ (and one from another run, other/), shards/ (video shards), journaled/ (the same with
    the commit journal of a killed switch), parts/ (a split built in 2 parts), index/, cache/
    (feature shards with their .done records), cached/ (a bundle trained on that cache)."""
    from vmr.data.shards import build_shards
    from vmr.model import VideoMomentRetrievalModel

    root = tmp_path_factory.mktemp("world")
    cfg = load_config(TINY, SMALL)
    write_bundle(VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling), root / "bundle", cfg)
    other = load_config(TINY, [*SMALL, "train.seed=1", "model.hidden_dim=64"])
    write_bundle(VideoMomentRetrievalModel.from_config(other.model, sampling=other.data.sampling), root / "other", other)
    shutil.copytree(shard_dir, root / "shards")
    shutil.copytree(shard_dir, root / "journaled")  # a switch of split train killed before it was finished
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    journal = {"split": "train", "entry": manifest["splits"]["train"], "old": [],
               "skipped": [s for s in manifest["skipped"] if s.get("split") == "train"]}
    (root / "journaled" / ".vmr-commit-train.json").write_text(json.dumps(journal))
    for index in range(2):
        build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], root / "parts", part=(index, 2), fps=2.0,
                     size=16, keyframe_interval=0, max_videos_per_shard=1, progress=False)
    quiet = contextlib.redirect_stderr(io.StringIO())
    with quiet, contextlib.redirect_stdout(io.StringIO()):
        assert main(["index", "--checkpoint", str(root / "bundle"), "--videos", str(synth_dir / "videos"),
                     "--out", str(root / "index"), "--videos-per-part", "2"]) == 0
        assert main(["features", "extract", "--config", str(TINY), *SMALL, "--shards", str(shard_dir),
                     "--out", str(root / "cache")]) == 0
    shutil.copytree(root / "bundle", root / "cached")
    extractor = json.loads((root / "cache" / "manifest.json").read_text())["extractor"]
    (root / "cached" / "features.json").write_text(json.dumps(extractor))
    return root


# ----- the readers: each command that reads a kind, and what its answer is ---------------------------------


@dataclass
class Reader:
    argv: Callable[[Path, Path], list[str]]  # (world, videos) -> the command
    answer: Callable[[Path, str], object]  # (world, stdout) -> what must not change silently
    findings: int | None = None  # a checker's exit code for "problems found, each listed" (vmr shards verify)


def stdout_json(world: Path, out: str):
    return json.loads(out, parse_constant=_refuse_constant)


def metrics(world: Path, out: str):
    return json.loads((world / "metrics.json").read_text(), parse_constant=_refuse_constant)


def collection_ids(world: Path, out: str):
    return sorted(json.loads(next((world / "index" / "keys").glob("*/ids.json")).read_text()))


def split_entry(folder: str, split: str):
    def answer(world: Path, out: str):
        entry = json.loads((world / folder / "manifest.json").read_text(), parse_constant=_refuse_constant)
        entry = entry["splits"][split]
        return sorted((s["samples"], s["queries"]) for s in entry["shards"])
    return answer


READERS = {
    "eval": Reader(lambda w, v: ["eval", "--checkpoint", str(w / "bundle"), "--shards", str(w / "shards" / "train-*.tar"),
                                 "--json", str(w / "metrics.json")], metrics),
    "verify": Reader(lambda w, v: ["shards", "verify", str(w / "shards")], split_entry("shards", "train"), 1),
    "verify_journaled": Reader(lambda w, v: ["shards", "verify", str(w / "journaled")],
                               split_entry("journaled", "train"), 1),
    "merge": Reader(lambda w, v: ["shards", "merge", "--out", str(w / "parts"), "--split", "train"],
                    split_entry("parts", "train")),
    "extract": Reader(lambda w, v: ["features", "extract", "--config", str(TINY), *SMALL, "--shards",
                                    str(w / "shards"), "--out", str(w / "cache")], split_entry("cache", "train")),
    "search": Reader(lambda w, v: ["search", "--index", str(w / "index"), "--query", QUERY], stdout_json),
    "reindex": Reader(lambda w, v: ["index", "--checkpoint", str(w / "bundle"), "--videos", str(v.parent),
                                    "--out", str(w / "index"), "--videos-per-part", "2"], collection_ids),
    "predict": Reader(lambda w, v: ["predict", "--checkpoint", str(w / "bundle"), "--video", str(v), "--query", QUERY],
                      stdout_json),
    "eval_cache": Reader(lambda w, v: ["eval", "--checkpoint", str(w / "cached"), "--shards",
                                       str(w / "cache" / "train-*.tar"), "--json", str(w / "metrics.json")], metrics),
}


# ----- the kinds of file ---------------------------------------------------------------------------------


@dataclass
class Kind:
    path: str  # inside the world; a tar member as "shard.tar::member-suffix"
    format: str  # json, yaml, safetensors, npy
    readers: tuple[str, ...]
    other: str | None = None  # the same file from another run


KINDS = {
    "video manifest": Kind("shards/manifest.json", "json", ("eval", "verify", "extract"), "index/manifest.json"),
    "commit journal": Kind("journaled/.vmr-commit-train.json", "json", ("verify_journaled",),
                           "parts/parts/train-p0000.json"),
    "part record": Kind("parts/parts/train-p0000.json", "json", ("merge",), "parts/parts/train-p0001.json"),
    "done record": Kind("cache/.done/train-000000.tar.json", "json", ("extract",), "cache/.done/train-000001.tar.json"),
    "index.json": Kind("index/index.json", "json", ("search",), "cached/features.json"),
    "index manifest": Kind("index/manifest.json", "json", ("search",), "cache/manifest.json"),
    "cache manifest": Kind("cache/manifest.json", "json", ("extract", "eval_cache"), "index/manifest.json"),
    "features.json": Kind("cached/features.json", "json", ("eval_cache",), "index/index.json"),
    "tower_config.json": Kind("bundle/tower_config.json", "json", ("predict",), "other/tower_config.json"),
    "preprocessor_config.json": Kind("bundle/preprocessor_config.json", "json", ("predict",),
                                     "other/tower_config.json"),
    "config.yaml": Kind("bundle/config.yaml", "yaml", ("predict",), "other/config.yaml"),
    "model.safetensors": Kind("bundle/model.safetensors", "safetensors", ("predict",), "other/model.safetensors"),
    "video sample json": Kind("shards/train-000000.tar::json", "json", ("eval", "verify")),
    "index sample json": Kind("index/videos-000000.tar::json", "json", ("search",)),
    "index tokens.npy": Kind("index/videos-000000.tar::tokens.npy", "npy", ("search",)),
    "index times.npy": Kind("index/videos-000000.tar::times.npy", "npy", ("search",)),
    # The collection's keys (vmr/ann.py): read by a search, and by a rebuild that resumes from its parts.
    "collection.json": Kind("index/keys/*/collection.json", "json", ("search",), "index/index.json"),
    "keys part record": Kind("index/keys/*/000000.json", "json", ("reindex",), "index/keys/*/000001.json"),
    "keys.npy": Kind("index/keys/*/keys.npy", "npy", ("search",), "index/keys/*/000000.npy"),
    "table.npy": Kind("index/keys/*/table.npy", "npy", ("search",), "index/keys/*/durations.npy"),
    "starts.npy": Kind("index/keys/*/starts.npy", "npy", ("search",), "index/keys/*/table.npy"),
    "segments.npy": Kind("index/keys/*/segments.npy", "npy", ("search",), "index/keys/*/starts.npy"),
    "ids.json": Kind("index/keys/*/ids.json", "json", ("search",), "index/keys/*/collection.json"),
    "prepared.npy": Kind("index/keys/*/prepared.npy", "npy", ("search",), "index/keys/*/000000.prepared.npy"),
    "prepared_rows.npy": Kind("index/keys/*/prepared_rows.npy", "npy", ("search",), "index/keys/*/starts.npy"),
    "prepared part": Kind("index/keys/*/000000.prepared.npy", "npy", ("reindex",), "index/keys/*/000001.prepared.npy"),
    "ann.faiss": Kind("index/keys/*/ann.faiss", "binary", ("search",), "index/keys/*/keys.npy"),
    "cache tokens.npy": Kind("cache/train-000000.tar::tokens.npy", "npy", ("eval_cache",)),
}


# ----- damages, by format: (name, bytes -> damaged bytes) -------------------------------------------------


def _refuse_constant(constant):
    raise ValueError(f"{constant} is not JSON")


def json_variants(data: bytes) -> list[tuple[str, bytes]]:
    """Per top-level key: missing, of the wrong type, NaN, huge, leading outside; and the whole:
    an extra key, not an object."""
    value = json.loads(data)
    if isinstance(value, list):  # a list of names (ids.json)
        return [("an object", b"{}"), ("one fewer", json.dumps(value[:-1]).encode()),
                ("a number in it", json.dumps([1, *value[1:]]).encode()),
                ("a name leading outside", json.dumps(["../../outside", *value[1:]]).encode())]
    variants = [("extra key", json.dumps({**value, "zz_extra": 1}).encode()), ("a list", b"[1, 2]")]
    for key, item in value.items():
        variants.append((f"no {key}", json.dumps({k: v for k, v in value.items() if k != key}).encode()))
        wrong = "x" if not isinstance(item, str) else 5
        variants.append((f"{key} of another type", json.dumps({**value, key: wrong}).encode()))
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            variants.append((f"{key} NaN", json.dumps({**value, key: math.nan}).encode()))
            variants.append((f"{key} huge", json.dumps({**value, key: 1e308 if isinstance(item, float) else 10**30}).encode()))
        if isinstance(item, str):
            variants.append((f"{key} leading outside", json.dumps({**value, key: "../../outside"}).encode()))
        if isinstance(item, list) and item:
            variants.append((f"{key} holding a number", json.dumps({**value, key: [1]}).encode()))
            if isinstance(item[0], dict):  # shard lists: each field of the first entry
                for field_, entry in item[0].items():
                    wrong = "../../outside" if field_ == "path" else 5 if isinstance(entry, str) else "x"
                    changed = [{**item[0], field_: wrong}, *item[1:]]
                    variants.append((f"{key}[0].{field_} damaged", json.dumps({**value, key: changed}).encode()))
        if isinstance(item, dict):
            variants.append((f"{key} with an extra key", json.dumps({**value, key: {**item, "zz_extra": 1}}).encode()))
            for sub in item:
                variants.append((f"{key}.{sub} of another type", json.dumps({**value, key: {**item, sub: [1]}}).encode()))
    return variants


def yaml_variants(data: bytes) -> list[tuple[str, bytes]]:
    value = yaml.safe_load(data)
    variants = [("not a mapping", b"- 1\n- 2\n"), ("garbage", b"model: [\n")]
    for section, items in value.items():
        variants.append((f"{section} of another type", yaml.safe_dump({**value, section: 5}).encode()))
        if isinstance(items, dict):
            variants.append((f"{section} with an extra key", yaml.safe_dump({**value, section: {**items, "zz": 1}}).encode()))
            for key, item in items.items():
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    variants.append((f"{section}.{key} NaN", yaml.safe_dump({**value, section: {**items, key: math.nan}}).encode()))
                    variants.append((f"{section}.{key} huge", yaml.safe_dump({**value, section: {**items, key: 10**30}}).encode()))
    return variants


def npy_variants(data: bytes) -> list[tuple[str, bytes]]:
    import numpy as np

    array = np.load(io.BytesIO(data))

    def npy(a) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, a)
        return buffer.getvalue()

    nan = array.astype(np.float32).copy()
    nan.flat[0] = np.nan
    return [("NaN", npy(nan)), ("one dimension less", npy(array.reshape(-1))), ("empty", npy(array[:0])),
            ("strings", npy(np.array(["a", "b"]))), (VALID + "large values", npy(np.full_like(array, 6e4)))]


def safetensors_variants(data: bytes) -> list[tuple[str, bytes]]:
    header = struct.pack("<Q", 2**40)  # a header length past the end of the file
    return [("a header past the end", header + data[8:]), ("another header", struct.pack("<Q", 9) + b'{"a": 1} ' + data[17:])]


# A damage whose name starts with this leaves a file as valid as any vmr writes (features of large
# values): it may change the answer; the run must still exit 0 with finite output, or refuse.
VALID = "valid: "

VARIANTS = {"binary": lambda data: [], "json": json_variants, "yaml": yaml_variants, "npy": npy_variants, "safetensors": safetensors_variants}


def damages(kind: Kind, data: bytes, world: Path) -> list[tuple[str, bytes]]:
    every = [("truncated", data[: len(data) // 2]), ("empty", b""), ("binary", bytes(range(256)) * 4)]
    every += VARIANTS[kind.format](data)
    if kind.other is not None:
        every.append(("another run's file", located(world, kind.other).read_bytes()))
    return every


# ----- reading and writing a kind's bytes (tar members re-recorded, so readers get past the sha256) --------


def located(world: Path, path: str) -> Path:
    """A kind's file in the world; ``*`` matches a folder named by content (the keys' model fingerprint)."""
    return next(world.glob(path)) if "*" in path else world / path


def read_kind(world: Path, kind: Kind) -> bytes:
    if "::" not in kind.path:
        return located(world, kind.path).read_bytes()
    shard, suffix = kind.path.split("::")
    with tarfile.open(world / shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f".{suffix}"))
        return tar.extractfile(member).read()


def write_kind(world: Path, kind: Kind, data: bytes) -> None:
    if "::" not in kind.path:
        located(world, kind.path).write_bytes(data)
        return
    from vmr.data.tars import sha256_of

    shard, suffix = kind.path.split("::")
    path = world / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, content in members:
            if member.name.endswith(f".{suffix}") and member.name == next(
                    m.name for m, _ in members if m.name.endswith(f".{suffix}")):
                content, member.size = data, len(data)
            tar.addfile(member, io.BytesIO(content))
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["path"] == path.name:
                entry.update(bytes=path.stat().st_size, sha256=sha256_of(path))
    manifest_path.write_text(json.dumps(manifest))


# ----- one run ---------------------------------------------------------------------------------------------


ANY = object()  # the expected answer after a damage that leaves a valid file


class Hang(BaseException):
    pass


def run(argv: list[str]) -> tuple[int | str, str, str]:
    """(exit code, or 'traceback: ...' / 'hang'; stdout; stderr) of one command, in this process."""
    def alarm(signum, frame):
        raise Hang()

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code: int | str = main(argv)
    except Hang:
        code = "hang"
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    except Exception as error:  # noqa: BLE001 - what the harness exists to find
        code = f"traceback: {type(error).__name__}: {str(error)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def verdict(code, out: str, err: str, answer, expected, findings: int | None = None) -> str | None:
    """What is wrong with one run, or None."""
    if not isinstance(code, int):
        return str(code)
    if "Traceback" in err:
        return "a traceback on stderr"
    if code == findings and "problem(s)" in err:  # a checker that lists what it found
        return None
    if code == 2:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        return None if lines and ": error: " in lines[-1] else f"exit 2 without an error line: {err[-200:]!r}"
    if code != 0:
        return f"exit {code}: {err.strip()[-200:]!r}"
    if "NaN" in out or "Infinity" in out:
        return "a non-finite number in its output"
    if answer != expected and expected is not ANY and not any(
            word in err for word in ("warning", "skipped", "left out", "not read", "again", "unreadable")):
        return f"exit 0 with another answer and no word about it: {str(answer)[:160]} != {str(expected)[:160]}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_every_damage_of_every_kind_is_refused_in_one_line_or_answered_right(name, base, synth_dir, tmp_path):
    kind, videos = KINDS[name], sorted((synth_dir / "videos").glob("*.mp4"))[0]
    expected = {}
    fresh = Path(shutil.copytree(base, tmp_path / "fresh", symlinks=True))
    for reader in kind.readers:
        code, out, err = run(READERS[reader].argv(fresh, videos))
        assert code == 0, f"{reader} on the undamaged world: {code} {err[-400:]}"
        expected[reader] = READERS[reader].answer(fresh, out)
    original = read_kind(base, kind)
    failures = []
    for damage, data in damages(kind, original, base):
        for reader in kind.readers:
            world = tmp_path / "world"
            shutil.rmtree(world, ignore_errors=True)
            shutil.copytree(base, world, symlinks=True)
            write_kind(world, kind, data)
            code, out, err = run(READERS[reader].argv(world, videos))
            try:
                answer = READERS[reader].answer(world, out) if code == 0 else None
            except Exception as error:  # noqa: BLE001 - an answer that cannot be read is a wrong one
                answer = f"unreadable: {error}"
            wanted = ANY if damage.startswith(VALID) else expected[reader]
            problem = verdict(code, out, err, answer, wanted, READERS[reader].findings)
            if problem:
                failures.append(f"{name} / {damage} / vmr {' '.join(READERS[reader].argv(world, videos)[:2])}: {problem}")
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures)
