"""Read landing files in bounded memory, whatever they hold.

A landing file is read in blocks and handed to the checks in chunks of lines, so what reading
costs follows the lines that carry data, not what a hostile file can make of them: blank lines
are counted and dropped block by block, a line longer than the line limit is hashed as it
streams past instead of being kept, Parquet rows are measured before they are turned into JSON,
and a file stops at the caps on its size, its lines and its decompressed size (quarantined whole,
with the cap it passed). While it is read the file's SHA-256 is taken, so the ledger can tell a
rewritten file from an unchanged one.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import polars as pl

from labelloop_assets.core import contracts as c
from labelloop_assets.core.files import UnreadableFile, open_landing_file

# Read this much of a file at a time; the lines of several blocks go to the checks together.
BLOCK_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 32 * 1024 * 1024
CHUNK_LINES = 100_000  # short lines: the checks' working set grows with lines, not bytes
# Parquet is read in batches of rows, then turned into JSON a slice of at most CHUNK_BYTES at a time.
PARQUET_BATCH_ROWS = 8192

LINE_COLUMNS = {
    "line_no": pl.Int64,
    "line": pl.String,
    "bad_encoding": pl.Boolean,
    # True for a line longer than the line limit that was hashed, not kept (`line` is then empty).
    "oversize": pl.Boolean,
    "line_sha256": pl.String,
}


@dataclass(frozen=True)
class Resume:
    """Where an earlier version of a file ended: a file that grew by appended lines is read from
    there, if its first `offset` bytes are still the ones ingested (same SHA-256)."""

    offset: int
    next_line: int
    sha256: str


@dataclass
class FileRead:
    """What reading one file found: filled in as its chunks are read."""

    size_bytes: int = 0
    ctime_ns: int | None = None  # the inode's change time: any write moves it, and no one can set it back
    sha256: str | None = None
    blank_lines: int = 0
    lines: int = 0  # physical lines (Parquet rows) in the file, blank ones included
    resumed_at_line: int = 1  # the first line read: 1, or where an appended file's new lines start


def empty_lines() -> pl.DataFrame:
    return pl.DataFrame(schema=LINE_COLUMNS)


class LandingFile:
    """One landing file, opened and checked; `chunks()` yields its lines, `read` says what was read.

    Opened once, without following a symbolic link swapped in since it was listed: what is read
    is the file whose type and size were checked here.
    """

    def __init__(self, path: Path, resume: Resume | None = None):
        self.path = path
        self.resume = resume
        self.read = FileRead()

    def _refuse(self, reason: str, detail: str) -> UnreadableFile:
        return UnreadableFile(reason, f"{self.path.name}: {detail}")

    def _open(self) -> tuple[BinaryIO, os.stat_result]:
        path = self.path
        if path.is_dir() and not path.is_symlink():
            raise self._refuse(c.UNREADABLE_FILE, "a folder labelloop cannot list (check its permissions)")
        if path.suffix.lower() not in c.SUPPORTED_SUFFIXES:
            raise self._refuse(c.UNSUPPORTED_FORMAT, f"expected one of {', '.join(c.SUPPORTED_SUFFIXES)}")
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                # A link would let whoever can write to the landing zone have labelloop read any
                # file it can read (into the corpus, the quarantine, the published snapshots).
                raise self._refuse(c.UNREADABLE_FILE, "a symbolic link; landing files must be regular files")
            handle = open_landing_file(path)
        except OSError as exc:
            raise self._refuse(c.UNREADABLE_FILE, exc.strerror or str(exc)) from None
        opened = os.fstat(handle.fileno())
        if not stat.S_ISREG(opened.st_mode):
            handle.close()
            raise self._refuse(c.UNREADABLE_FILE, "not a regular file")
        if opened.st_size > c.MAX_FILE_BYTES:
            handle.close()
            raise self._refuse(c.FILE_TOO_LARGE, f"{opened.st_size} bytes > {c.MAX_FILE_BYTES}")
        self.read.ctime_ns = opened.st_ctime_ns
        return handle, opened

    def chunks(self) -> Iterator[pl.DataFrame]:
        """Frames of LINE_COLUMNS, each at most about CHUNK_BYTES of lines, blank lines left out."""
        handle, _ = self._open()
        with handle:
            try:
                if self.path.suffix.lower() == ".parquet":
                    yield from self._parquet(handle)
                else:
                    yield from self._jsonl(handle)
            except OSError as exc:
                raise self._refuse(c.UNREADABLE_FILE, exc.strerror or str(exc)) from None

    # ---------------------------------------------------------------- JSON Lines

    def _jsonl(self, handle: BinaryIO) -> Iterator[pl.DataFrame]:
        # Lines are counted first (cheap: no line is decoded), so a file past the cap is refused
        # before any of its lines is checked; the count is checked again while reading.
        self._count_lines(sum(block.count(b"\n") for block in iter(lambda: handle.read(BLOCK_BYTES), b"")))
        handle.seek(0)
        digest = hashlib.sha256()
        line_no, first = 0, True
        if self.resume is not None and self._prefix_matches(handle, digest):
            line_no, first = self.resume.next_line - 1, False
        else:
            handle.seek(0)
            digest = hashlib.sha256()
            self.read.size_bytes = 0
        self.read.resumed_at_line = line_no + 1
        carry = b""  # the start of a line whose end is in a later block
        skipping = None  # the digest of an over-long line, while it streams past
        pending: list[pl.DataFrame] = []
        pending_bytes = 0
        while block := handle.read(BLOCK_BYTES):
            digest.update(block)
            self.read.size_bytes += len(block)
            if self.read.size_bytes > c.MAX_FILE_BYTES:  # it grew after it was opened
                raise self._refuse(c.FILE_TOO_LARGE, f"more than {c.MAX_FILE_BYTES} bytes")
            if first:
                first = False
                if block.startswith(c.UTF16_32_BOMS):
                    # Every line would fail, most as malformed JSON: name the real problem once.
                    raise self._refuse(
                        c.INVALID_ENCODING, "UTF-16 or UTF-32 text (byte-order mark); expected UTF-8"
                    )
                block = block.removeprefix(b"\xef\xbb\xbf")  # not part of line 1
            start = 0
            if skipping is not None:
                end = block.find(b"\n")
                if end < 0:
                    skipping.update(block)
                    continue
                skipping.update(block[:end])
                line_no += 1
                pending.append(_oversize_line(line_no, skipping.hexdigest()))
                skipping, start = None, end + 1
            last = block.rfind(b"\n", start)
            if last < 0:
                carry += block[start:]
            else:
                data = carry + block[start:last]
                carry = block[last + 1:]
                count = data.count(b"\n") + 1
                self._count_lines(line_no + count)
                frame = _lines_frame(data, line_no + 1)
                self.read.blank_lines += count - frame.height
                line_no += count
                pending.append(frame)
                pending_bytes += len(data)
            if len(carry) > c.MAX_LINE_BYTES:
                skipping, carry = hashlib.sha256(carry), b""
            if pending_bytes >= CHUNK_BYTES or sum(f.height for f in pending) >= CHUNK_LINES:
                yield _concat(pending)
                pending, pending_bytes = [], 0
        if skipping is not None:
            line_no += 1
            pending.append(_oversize_line(line_no, skipping.hexdigest()))
        elif carry:  # the last line, without a newline after it
            line_no += 1
            frame = _lines_frame(carry, line_no)
            self.read.blank_lines += 1 - frame.height
            pending.append(frame)
        self._count_lines(line_no)
        self.read.lines = line_no
        self.read.sha256 = digest.hexdigest()
        if pending:
            yield _concat(pending)

    def _prefix_matches(self, handle: BinaryIO, digest: hashlib._Hash) -> bool:
        """Hash the first `resume.offset` bytes; true when they are what was ingested before and
        end a line (an appended file), leaving the handle just after them."""
        remaining = self.resume.offset
        last = b""
        while remaining > 0:
            block = handle.read(min(BLOCK_BYTES, remaining))
            if not block:
                return False
            digest.update(block)
            self.read.size_bytes += len(block)
            remaining -= len(block)
            last = block[-1:]
        return last == b"\n" and digest.copy().hexdigest() == self.resume.sha256

    def _count_lines(self, lines: int) -> None:
        if lines > c.MAX_LINES_PER_FILE:
            raise self._refuse(
                c.TOO_MANY_LINES, f"more than {c.MAX_LINES_PER_FILE} lines (blank lines count too)"
            )

    # ---------------------------------------------------------------- Parquet

    def _parquet(self, handle: BinaryIO) -> Iterator[pl.DataFrame]:
        import duckdb
        import pyarrow as pa
        import pyarrow.parquet as pq

        digest = hashlib.file_digest(handle, "sha256")  # the file as it is read below
        self.read.sha256 = digest.hexdigest()
        self.read.size_bytes = handle.tell()
        # What a file holds must not show in a quarantine detail: errors are named by their type.
        unreadable = (pa.ArrowException, duckdb.Error, ValueError, TypeError, NotImplementedError,
                      OverflowError, KeyError, IndexError)
        try:
            handle.seek(0)
            columns = pq.ParquetFile(handle).schema
            # Text stays dictionary-encoded, nested text too: a value repeated on every row (or in
            # every element of a list) is held once, and measured once.
            texts = [columns.column(i).path for i in range(len(columns))
                     if columns.column(i).physical_type == "BYTE_ARRAY"]
            handle.seek(0)
            parquet = pq.ParquetFile(handle, read_dictionary=texts)
            meta = parquet.metadata
        except MemoryError:
            raise
        except unreadable as exc:
            raise self._refuse(c.UNREADABLE_FILE, f"not a readable Parquet file ({type(exc).__name__})") from None
        self._count_lines(meta.num_rows)
        decoded = _decoded_bytes(meta)
        if decoded > c.MAX_DECOMPRESSED_BYTES:
            raise self._refuse(
                c.DECOMPRESSED_TOO_LARGE, f"{decoded} bytes of values once decoded > {c.MAX_DECOMPRESSED_BYTES}"
            )
        to_json = _JsonRows()
        line_no = 0
        try:
            # Rows are measured first, without decoding their text, so that a file past the cap is
            # refused before any of its rows is turned into text.
            # (8 bytes a row, kept for the second pass rather than measured again.)
            sizes = [_row_sizes(b) for b in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)]
            total = sum(int(s.sum()) for s in sizes)
            if total > c.MAX_DECOMPRESSED_BYTES:
                raise self._refuse(
                    c.DECOMPRESSED_TOO_LARGE, f"{total} bytes of rows once decompressed > {c.MAX_DECOMPRESSED_BYTES}"
                )
            for batch, batch_sizes in zip(parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS), sizes, strict=True):
                yield from to_json.chunks(batch, batch_sizes.tolist(), line_no)
                line_no += batch.num_rows
        except MemoryError:
            raise
        except unreadable as exc:
            raise self._refuse(
                c.UNREADABLE_FILE, f"not a Parquet file labelloop can read ({type(exc).__name__})"
            ) from None
        finally:
            to_json.close()
        self.read.lines = line_no


# Bytes per value of Parquet's fixed-width physical types (a BYTE_ARRAY value is read as a 4-byte
# dictionary index; its text is in the dictionary, counted by the column chunk's own size).
_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "BYTE_ARRAY": 4}


def _decoded_bytes(meta) -> int:
    """What a Parquet file's values take once decoded, from its footer alone: run-length and
    dictionary encoding can make a few kilobytes hold billions of values."""
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for i in range(group.num_columns):
            column = group.column(i)
            width = _WIDTH.get(column.physical_type)
            if width is None:  # FIXED_LEN_BYTE_ARRAY
                width = meta.schema.column(i).length or 1
            total += column.num_values * width + column.total_uncompressed_size
    return total


def _row_sizes(batch):
    """Each row's size as JSON text, estimated without decoding its text (dictionary entries are
    measured once, lists and structs summed over their elements)."""
    import numpy as np

    sizes = np.full(batch.num_rows, 2, dtype=np.int64)
    for field, column in zip(batch.schema, batch.columns, strict=True):
        sizes += len(field.name) + 4 + _value_sizes(column)
    return sizes


def _value_sizes(array):
    """Each value's size as JSON text, for any Arrow array (nested ones included)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind, n = array.type, len(array)
    if pa.types.is_dictionary(kind):
        entries = _value_sizes(array.dictionary)
        if not len(entries):
            return np.zeros(n, dtype=np.int64)
        return entries[array.indices.fill_null(0).to_numpy(zero_copy_only=False)]
    if (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64) + 2
    if pa.types.is_fixed_size_list(kind):
        elements = _value_sizes(array.flatten())
        parents = np.repeat(np.arange(n), kind.list_size)[: len(elements)]
        return np.bincount(parents, weights=elements + 1, minlength=n).astype(np.int64) + 2
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        offsets = array.offsets.to_numpy(zero_copy_only=False)
        first, count = int(offsets[0]), int(offsets[-1] - offsets[0])
        if pa.types.is_map(kind):
            elements = (_value_sizes(array.keys.slice(first, count))
                        + _value_sizes(array.items.slice(first, count)) + 1)
        else:
            elements = _value_sizes(array.values.slice(first, count))
        parents = np.repeat(np.arange(n), np.diff(offsets))
        return np.bincount(parents, weights=elements + 1, minlength=n).astype(np.int64) + 2
    if pa.types.is_struct(kind):
        sizes = np.full(n, 2, dtype=np.int64)
        for field, child in zip(kind, array.flatten(), strict=True):
            sizes += len(field.name) + 4 + _value_sizes(child)
        return sizes
    return np.full(n, 24, dtype=np.int64)  # a number, a time, a boolean: at most a few dozen characters


def _plain_type(kind):
    """The type with every dictionary replaced by its values' type (nested ones too)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _plain_type(kind.value_type)
    if pa.types.is_map(kind):
        return pa.map_(_plain_type(kind.key_type), _plain_type(kind.item_type))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        make = pa.list_ if pa.types.is_list(kind) else pa.large_list
        return make(pa.field(kind.value_field.name, _plain_type(kind.value_type), kind.value_field.nullable))
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(pa.field(kind.value_field.name, _plain_type(kind.value_type)), kind.list_size)
    if pa.types.is_struct(kind):
        return pa.struct([pa.field(f.name, _plain_type(f.type), f.nullable) for f in kind])
    return kind


class _JsonRows:
    """Parquet rows as JSON lines, by DuckDB's to_json (the same text whatever the column types),
    on a connection of its own so a file's rows never touch the store's connection."""

    ROWS = "labelloop_parquet_rows"

    def __init__(self):
        self._con = None

    def chunks(self, batch, sizes: list[int], before: int) -> Iterator[pl.DataFrame]:
        import duckdb
        import pyarrow as pa

        if self._con is None:
            self._con = duckdb.connect(config={"threads": "1"})
        plain = pa.schema([pa.field(f.name, _plain_type(f.type), f.nullable) for f in batch.schema])
        start = 0
        while start < batch.num_rows:
            end, used = start, 0
            while end < batch.num_rows and (end == start or used + sizes[end] <= CHUNK_BYTES):
                used += sizes[end]
                end += 1
            keep = [s <= c.MAX_LINE_BYTES for s in sizes[start:end]]
            numbers = list(range(before + start + 1, before + end + 1))
            kept = batch.slice(start, end - start).filter(pa.array(keep))
            decoded = pa.Table.from_batches([kept]).cast(plain)
            # Each row as one struct column: no column of the file can shadow what is converted.
            rows = pa.StructArray.from_arrays(
                [column.combine_chunks() for column in decoded.columns], fields=list(plain)
            )
            self._con.register(self.ROWS, pa.table({"row": rows}))
            try:
                lines = self._con.sql(f"SELECT to_json(row)::VARCHAR AS line FROM {self.ROWS}").pl()
            finally:
                self._con.unregister(self.ROWS)
            kept_numbers = [n for n, k in zip(numbers, keep, strict=True) if k]
            frames = [pl.DataFrame({"line_no": kept_numbers, "line": lines["line"]},
                                   schema={"line_no": pl.Int64, "line": pl.String}).with_columns(
                bad_encoding=pl.lit(False), oversize=pl.lit(False), line_sha256=pl.lit(None, pl.String)
            )]
            frames += [_oversize_line(n, None) for n, k in zip(numbers, keep, strict=True) if not k]
            yield _concat(frames).sort("line_no")
            start = end

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


def _lines_frame(data: bytes, first_line: int) -> pl.DataFrame:
    """Non-blank lines of complete lines (no final newline), numbered from `first_line`."""
    try:
        # Split as bytes and validated by Polars: half the cost of decoding into Python strings.
        lines, bad = pl.Series("line", data.split(b"\n"), dtype=pl.Binary).cast(pl.String), None
    except pl.exceptions.PolarsError:  # bytes that are not UTF-8 in some line
        # Line by line, so that only the lines holding the bad bytes are flagged (a newline byte
        # never occurs inside a multi-byte UTF-8 character).
        lines, bad = [], []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
                bad.append(False)
            except UnicodeDecodeError:
                lines.append(raw.decode("utf-8", errors="replace"))
                bad.append(True)
    frame = pl.DataFrame([pl.Series("line", lines, dtype=pl.String)]).with_row_index(
        "line_no", offset=first_line
    )
    # Files concatenated with `cat` keep their byte-order marks at the start of a line; a carriage
    # return before the newline is part of the line break.
    frame = frame.select(
        pl.col("line_no").cast(pl.Int64),
        pl.col("line").str.strip_prefix("\ufeff").str.strip_suffix("\r"),
        bad_encoding=pl.Series(bad, dtype=pl.Boolean) if bad else pl.lit(False),
        oversize=pl.lit(False),
        line_sha256=pl.lit(None, pl.String),
    )
    return frame.filter(pl.col("line").str.strip_chars().str.len_bytes() > 0)


def _oversize_line(line_no: int, sha256: str | None) -> pl.DataFrame:
    return pl.DataFrame(
        {"line_no": [line_no], "line": [""], "bad_encoding": [False], "oversize": [True], "line_sha256": [sha256]},
        schema=LINE_COLUMNS,
    )


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames, how="vertical") if frames else empty_lines()


def read_lines(path: Path, resume: Resume | None = None) -> tuple[pl.DataFrame, FileRead]:
    """Every non-blank line of a file at once (for small files and tests); ingest reads chunks."""
    landing = LandingFile(path, resume)
    return _concat(list(landing.chunks())), landing.read
