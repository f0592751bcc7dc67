"""A results folder at a URI (``s3://bucket/prefix``, any file system pyarrow takes), copied to
a local cache to be drawn like any other: study.json and the five tables, not Tune's
checkpoints. Each run copies it afresh, so the figures show what the store holds now."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from study import results

#: What is copied: the study's record and its tables (``tune/`` and ``figures/`` are not).
COPIED_TABLES: tuple[str, ...] = ("trials", "epochs", "layers", "steps", "probes")


class FetchError(Exception):
    """The results at a URI cannot be read (message names the URI and why)."""


def cache_root() -> Path:
    """Where copies live: $XDG_CACHE_HOME/bnstudy/results (~/.cache/bnstudy/results)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnstudy" / "results"


def local_copy(uri: str, root: Path | None = None) -> Path:
    """Copy the results folder at ``uri`` into ``root`` (default: ``cache_root()``), under a
    path made of the URI's parts, and return that local folder.

    Raises:
        FetchError: the URI's file system is unknown or out of reach, or holds no study there.
    """
    parts = urlsplit(uri.rstrip("/"))
    dest = (root or cache_root()) / parts.scheme / parts.netloc / parts.path.lstrip("/")
    try:
        fs, path = results.storage.resolve(uri.rstrip("/"))
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError) as e:
        raise FetchError(f"{uri}: {' '.join(str(e).split())}") from None
    names = {i.base_name: i.type for i in found}
    if "trials" not in names:
        raise FetchError(f"{uri} holds no results (no trials/ under it)")
    print(f"copying {uri} to {dest} ...", file=sys.stderr, flush=True)
    for name in COPIED_TABLES:
        shutil.rmtree(dest / name, ignore_errors=True)  # a file gone from the store goes here too
        if names.get(name) == pafs.FileType.Directory:
            (dest / name).mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{path}/{name}", str(dest / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
    (dest / "study.json").unlink(missing_ok=True)
    if names.get("study.json") == pafs.FileType.File:
        (dest / "study.json").write_bytes(results.storage.read_bytes(f"{uri.rstrip('/')}/study.json"))
    return dest
