"""What the landing zone holds right now, summed up in a few bytes.

Each ingest step records the digest of the listing it is about to read (in its materialization
metadata); the landing sensor lists the folders again and asks for a run only when a kind's
listing matches neither that record nor its own cursor. Both read the same listing here, so a run
started any way (the sensor, the demo, a manual launch) counts as seen, and the sensor's cursor
stays the same size however many files have ever landed.
"""

import hashlib
import os
from pathlib import Path

from labelloop_assets.core.files import landing_names
from labelloop_assets.core.settings import LANDING_KINDS, Home


def landed_files(home: Home, kinds: tuple[str, ...] = LANDING_KINDS) -> dict[str, str]:
    """Every complete landing file, as `kind/name` or `kind/producer/name`, with its size and
    change time (ctime): a file rewritten or appended to under a name already seen changes them."""
    found = {}
    for kind in kinds:
        folder = home.landing_dir(kind)
        for name in landing_names(folder):
            try:
                st = os.lstat(os.path.join(folder, name))
                found[f"{kind}/{name}"] = f"{st.st_size}:{st.st_ctime_ns}"
            except OSError:  # removed since it was listed, or a folder that cannot be listed
                found[f"{kind}/{name}"] = "-"
    return found


def listing_digest(files: dict[str, str]) -> str:
    """One short digest of a listing: any file added, removed, rewritten or appended to changes it."""
    # One update of the joined text: a sensor tick hashes every landed file's entry.
    text = "".join(f"{name}\t{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def kind_digest(home: Home, kind: str) -> str:
    """The digest of one kind's landing folder as it is now."""
    return listing_digest(landed_files(home, (kind,)))


def gold_signature(home: Home) -> str | None:
    """gold.jsonl's size and change time (ctime, as for landing files: an edit that puts the
    modification time back still changes it); None without one."""
    try:
        found = Path(home.gold_file).lstat()
    except OSError:
        return None
    return f"gold.jsonl@{found.st_size}-{found.st_ctime_ns}"
