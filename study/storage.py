"""Where a results folder lives: a local path, or a URI that pyarrow's file systems take
(``s3://bucket/prefix``, ``gs://…``, ``hdfs://…``). The few file operations the writer, the
sweep's plan and the analysis need, the same for both (docs/design.md, "Results layout").

A location is a ``str`` URI or a local ``Path``; ``join`` keeps it so. Local writes go through a
temporary name and a rename; an object store has no rename, but one object's upload is all or
nothing, so a reader never sees half a file there either.

This module imports only pyarrow and the standard library (the analysis reads through it).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

Location = str | Path
#: Ends the name of a local file still being written (hidden too: it starts with a dot).
TMP_SUFFIX = ".tmp"


def is_uri(where: str | os.PathLike) -> bool:
    """Whether ``where`` names a file system other than the local one (``scheme://…``)."""
    return "://" in str(where) and not str(where).startswith("file://")


def location(text: str | os.PathLike) -> Location:
    """A user's ``--out`` (or the analysis' folder argument) as a location: a URI as given,
    less any trailing slash; a local path made absolute."""
    if is_uri(text):
        return str(text).rstrip("/")
    return Path(str(text).removeprefix("file://")).expanduser().resolve()


def join(where: Location, *parts: str) -> Location:
    """``where``/``parts``, of the same kind as ``where``."""
    if isinstance(where, Path) or not is_uri(where):
        return Path(where).joinpath(*parts)
    return "/".join([str(where).rstrip("/"), *parts])


@functools.lru_cache(maxsize=16)
def _filesystem(scheme_netloc: str) -> pafs.FileSystem:
    # One per bucket: making an S3 file system resolves the bucket's region (a request).
    return pafs.FileSystem.from_uri(scheme_netloc)[0]


def resolve(where: Location) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system holding ``where`` and the path inside it."""
    if not is_uri(where):
        return pafs.LocalFileSystem(), str(Path(where))
    parts = urlsplit(str(where))
    return _filesystem(f"{parts.scheme}://{parts.netloc}"), f"{parts.netloc}{parts.path}"


def kind(where: Location) -> pafs.FileType:
    """What is at ``where``: ``FileType.File``, ``Directory`` or ``NotFound``. An object store
    has no folders: a prefix with objects under it is a ``Directory``."""
    fs, path = resolve(where)
    return fs.get_file_info(path).type


def exists(where: Location) -> bool:
    return kind(where) != pafs.FileType.NotFound


def is_file(where: Location) -> bool:
    return kind(where) == pafs.FileType.File


def file_names(folder: Location, suffix: str = "") -> list[str]:
    """The names of the files directly in ``folder`` that end in ``suffix``, sorted; none where
    it does not exist."""
    fs, path = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def read_bytes(where: Location) -> bytes:
    fs, path = resolve(where)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(where: Location, data: bytes) -> None:
    """Write ``data`` to ``where`` whole or not at all; locally readable as the umask allows
    (not only by its owner, as a bare temporary file would be)."""
    if is_uri(where):
        fs, path = resolve(where)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    with atomic_local_file(Path(where)) as tmp:
        tmp.write_bytes(data)


def delete(where: Location) -> None:
    """Remove the file at ``where`` if it is there."""
    fs, path = resolve(where)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def folder_names(folder: Location) -> list[str]:
    """The names of the folders (on an object store: the prefixes) directly in ``folder``,
    sorted; none where it does not exist."""
    fs, path = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def delete_folder(where: Location) -> None:
    """Remove the folder at ``where``: locally only if it is empty (a stray temporary file
    keeps it, and nothing is lost); on an object store the prefix, with whatever marker the
    store keeps for it."""
    if not is_uri(where):
        try:
            os.rmdir(where)
        except OSError:
            pass
        return
    fs, path = resolve(where)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


class atomic_local_file:
    """``with atomic_local_file(path) as tmp:`` write ``tmp``; on success it becomes ``path``
    (a rename), on an exception it is removed."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=TMP_SUFFIX, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from a group
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
