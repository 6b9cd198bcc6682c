"""Files on disk: the landing zone's listing and reading, and atomic, durable writes.

Landing files are read through handles that refuse a symbolic link put in their place, and
listed without their producers' work in progress; whatever labelloop writes (models, reports,
review decisions) appears whole under its name or not at all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO


class UnreadableFile(Exception):
    """A landing file that cannot be read at all; it is quarantined whole."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_landing_name(name: str) -> bool:
    """Temp names of atomic writers (dot-prefixed, `.tmp`, `.part`) are not landed yet."""
    return not name.startswith((".", "_")) and not name.endswith((".tmp", ".part", ".partial"))


def is_landing_file(path: Path | os.DirEntry) -> bool:
    """A path or a directory entry (the sensor's scandir reads the type without a stat)."""
    # A symbolic link is listed (even a dangling one) so that it is quarantined, not skipped.
    return (path.is_file() or path.is_symlink()) and is_landing_name(path.name)


def landing_names(folder: Path) -> list[str]:
    """Complete landing files of one kind, as sorted paths relative to `folder`: directly in it, or
    in a producer's subfolder (`<producer>/<name>`). Hidden or temp names are someone's work in
    progress and are not read. Every other file below a producer's folder is listed too, however
    deep (ingest quarantines it by its own path, so none is skipped silently), and so is a folder
    that cannot be listed (quarantined until it can: its files then have paths of their own).
    Plain strings: the sensor lists tens of thousands each tick, and a Path per file costs more
    than reading the directory."""
    found: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        # scandir reads the type from the directory entry: no stat per file.
        if entry.is_dir(follow_symlinks=False):
            if is_landing_name(entry.name):
                _names_below(entry.path, entry.name + "/", found)
        elif is_landing_file(entry):
            found.append(entry.name)
    found.sort()
    return found


def _names_below(folder: str, prefix: str, found: list[str]) -> None:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:  # removed while it was being listed
        return
    except OSError:
        found.append(prefix.rstrip("/"))
        return
    for entry in entries:
        if not is_landing_name(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            _names_below(entry.path, prefix + entry.name + "/", found)
        elif is_landing_file(entry):
            found.append(prefix + entry.name)


def open_landing_file(path: Path) -> BinaryIO:
    """Open a landing file for reading, refusing (OSError) a symbolic link put in its place.

    Non-blocking, so that a named pipe swapped in is opened at once (and then refused as not a
    regular file) instead of hanging the run; reads of a regular file are not affected.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.fdopen(os.open(path, flags), "rb")


def write_atomically(path: Path, text: str, durable: bool = False) -> Path:
    """Write to a dot-prefixed temp name beside `path`, then rename: readers see all or nothing.

    `durable` also flushes the file and the rename to disk, so that the write survives a power
    loss (for state the database refers to; derived reports can be rebuilt and skip the cost).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    if durable:
        sync_to_disk(tmp)
    os.replace(tmp, path)
    if durable:
        sync_to_disk(path.parent)
    return path


def sync_to_disk(path: Path) -> None:
    """fsync a file, or a folder (which makes the renames and creations inside it durable).

    A folder is synced where the platform allows it: some systems and network filesystems
    refuse to open or fsync one, and a refusal there must not fail the write.
    """
    folder = path.is_dir()
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(descriptor)


def path_sha256(path: Path) -> str:
    """A file's SHA-256, read in chunks (a model file may be large)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def landing_file_sha256(path: Path) -> str | None:
    """A landing file's SHA-256, read in chunks through a handle that refuses a link (a file
    refused for its size must not be read into memory to be hashed); None if it cannot be read."""
    try:
        with open_landing_file(path) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None
