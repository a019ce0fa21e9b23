"""``manifest.json``: the one reader of a shard folder's manifest, and who may write the folder.

Layout (video shards and feature shards alike)::

  {"kind": "videos" | "features", "splits": {<split>: {"shards": [{"path", "samples", "queries",
   "bytes", "sha256"}], "samples", "queries", ...}}, "skipped": [...], "extractor"?: {...}}

A manifest without ``kind`` (written before kinds were recorded) holds video shards. A folder holds
one kind; a writer of the other kind, or of a split that exists, is refused unless ``--overwrite``.
"""

from __future__ import annotations

import re
from pathlib import Path

from vmr.errors import UserError
from vmr.io import confined, field, objects, read_json

MANIFEST = "manifest.json"
KINDS = {"videos": "video shards", "features": "feature shards"}


def check_split(split: str, where: str = "--split") -> str:
    """A split name: the prefix of its shards' file names, so letters, digits, '_' and '-' only."""
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise UserError(f"{where}: {split!r} must be letters, digits, '_' or '-'")
    return split


def empty_manifest(kind: str) -> dict:
    return {"kind": kind, "splits": {}, "skipped": [], "params": {}}


def read_manifest(folder: Path, kind: str | None = None) -> dict:
    """The folder's manifest, every field a reader uses checked (one line naming the file and key
    otherwise); an empty one of ``kind`` when there is none. Shard names stay inside the folder."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return empty_manifest(kind or "videos")
    manifest = read_json(path)
    where = str(path)
    found = field(manifest, "kind", str, where, default="videos")
    if found not in KINDS:
        raise UserError(f"{where}: 'kind' is {found!r}, not one of {', '.join(KINDS)}")
    manifest["kind"] = found
    for split, info in field(manifest, "splits", dict, where).items():
        at = f"{where}: splits.{split}"
        if not isinstance(info, dict):
            raise UserError(f"{at} must be an object")
        for number, shard in enumerate(field(info, "shards", list, at)):
            check_shard(folder, shard, f"{at}.shards[{number}]", complete=False)
    objects(manifest, "skipped", where, default=[])
    field(manifest, "params", dict, where, default={})
    for split, info in manifest["splits"].items():
        field(info, "params", dict, f"{where}: splits.{split}", default={})
    if found == "features":
        check_extractor(field(manifest, "extractor", dict, where), f"{where}: extractor")
    return manifest


def by_tower(extractor: dict | None) -> bool:
    """Whether features were made by a model's own vision tower (``vmr features extract``, saved
    encodings, indexes), not imported: their ``kind`` is the tower's backbone."""
    return (extractor or {}).get("kind", "imported") != "imported"


def check_extractor(extractor: dict, where: str) -> None:
    """What readers of feature shards use of the ``extractor`` record, type-checked: its ``kind``
    (``imported``, or the backbone of the tower that made them), ``width``, ``tokens`` per frame,
    the ``sampling`` spec's ``fps``, and for a tower's features the ``vision_sha256``."""
    field(extractor, "kind", str, where)
    for key in ("width", "tokens"):
        if field(extractor, key, int, where) < 1:
            raise UserError(f"{where}: '{key}' must be >= 1")
    fps = field(field(extractor, "sampling", dict, where), "fps", (int, float), f"{where}.sampling")
    if not fps > 0:
        raise UserError(f"{where}.sampling: 'fps' must be positive")
    if by_tower(extractor):
        field(extractor, "vision_sha256", str, where)
    field(extractor, "text", bool, where, default=False)


def check_shard(folder: Path, shard, where: str, complete: bool = True) -> Path:
    """A shard's entry (a manifest's, a part's or an extracted shard's record): an object whose
    ``path`` stays inside ``folder``, with counts >= 0, and with ``complete`` its ``bytes`` and
    ``sha256`` (optional in manifests of older builds). Returns the shard's path."""
    if not isinstance(shard, dict):
        raise UserError(f"{where} must be an object")
    path = confined(folder, field(shard, "path", str, where), f"{where}.path")
    for key in ("samples", "queries"):
        if field(shard, key, int, where) < 0:
            raise UserError(f"{where}: '{key}' must be >= 0")
    optional = ... if complete else None  # field's "required" marker, or the default when absent
    size = field(shard, "bytes", int, where, default=optional)
    if size is not None and size < 0:
        raise UserError(f"{where}: 'bytes' must be >= 0")
    field(shard, "sha256", str, where, default=optional)
    return path


def claim(folder: Path, kind: str, split: str | None, overwrite: bool) -> dict:
    """The manifest of ``folder`` for a writer of ``kind`` (and ``split``): a folder of the other
    kind, or an existing split, is refused unless ``overwrite``."""
    manifest = read_manifest(folder, kind)
    if manifest["kind"] != kind and manifest["splits"]:
        if not overwrite:
            raise UserError(f"{folder}: holds {KINDS[manifest['kind']]}, not {KINDS[kind]}; write to another "
                            "folder, or pass --overwrite to replace them")
        manifest = empty_manifest(kind)
    if split is not None and split in manifest["splits"] and not overwrite:
        raise UserError(f"{folder}: split {split!r} already exists; pass --overwrite to replace it")
    return manifest


def shard_entry(url: str) -> tuple[str, dict] | None:
    """(split, manifest entry) of a local shard from the manifest beside it; None without one."""
    path = Path(url)
    if not path.is_file() or not (path.parent / MANIFEST).is_file():
        return None
    for split, info in read_manifest(path.parent)["splits"].items():
        for shard in info["shards"]:
            if shard["path"] == path.name:
                return split, shard
    return None


def extractor_of(urls: list[str]) -> dict | None:
    """The extractor of feature shards (from the manifest beside the first local one), None for
    video shards or shards without a manifest."""
    for url in urls:
        path = Path(url)
        if path.is_file() and (path.parent / MANIFEST).is_file():
            manifest = read_manifest(path.parent)
            return manifest["extractor"] if manifest["kind"] == "features" else None
    return None
