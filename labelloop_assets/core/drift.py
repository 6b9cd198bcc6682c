"""Drift between a baseline and a current window: of the label distribution and of features.

Label drift. Shares p (baseline) and q (current) over the label set are compared two ways:
  - Jensen-Shannon distance, base 2, on the raw shares: the square root of the JS divergence,
    0 for identical distributions and 1 for disjoint ones. It is what
    scipy.spatial.distance.jensenshannon(p, q, base=2) returns; it needs no smoothing.
  - Population Stability Index, PSI = sum_k (q_k - p_k) ln(q_k / p_k). A class empty on one side
    makes a term infinite, so both share vectors are smoothed first: PSI_EPSILON is added to
    every share and the vector renormalized, s_k = (share_k + eps) / (1 + K eps). A class never
    seen in the baseline then contributes a large but finite term, dominated by eps.

Feature drift. Per feature column, PSI over quantile bins cut on the baseline (smoothed the same
way) and the Wasserstein-1 distance on the raw values (what scipy.stats.wasserstein_distance
returns, in the feature's own unit; divide by the baseline standard deviation to compare
features). NaN and Inf are dropped per column, not per row, and counted.

Thresholds. A common industry reading of PSI: below 0.1 no real shift, 0.1 to 0.25 a moderate
one, above 0.25 a significant one. They are rules of thumb, not tests: PSI grows with the number
of bins and, on small samples, with noise alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

# NumPy is imported where used: loading the code location must not pay for it (a tenth of its time).
if TYPE_CHECKING:
    import numpy as np

# Added to every share (then renormalized) before PSI, so an empty bin or class gives a large
# but finite term instead of an infinite one.
PSI_EPSILON = 1e-4

# PSI < 0.1: no real shift; 0.1-0.25: moderate; > 0.25: significant (this is where it alerts).
PSI_ALERT = 0.25
# A feature counts as drifted when its PSI is above this.
FEATURE_PSI_WARN = 0.25

MAX_DRIFTED_LISTED = 10

PER_LABEL_SCHEMA = {
    "label": pl.String,
    "baseline_share": pl.Float64,
    "current_share": pl.Float64,
    "psi_term": pl.Float64,
}
FEATURE_SCHEMA = {
    "feature": pl.String,
    "psi": pl.Float64,
    "wasserstein": pl.Float64,
    "baseline_std": pl.Float64,
    "n_nan_dropped": pl.Int64,
    "note": pl.String,
}


@dataclass(frozen=True)
class LabelDrift:
    """How far the current label distribution is from the baseline one, and per label."""

    js_distance: float | None
    psi: float | None
    n_baseline: int
    n_current: int
    per_label: pl.DataFrame  # label, baseline_share, current_share, psi_term
    absent_from_baseline: tuple[str, ...]  # labels seen now but never in the baseline
    note: str | None


def label_drift(
    baseline: pl.Series, current: pl.Series, labels: tuple[str, ...] = ()
) -> LabelDrift:
    """JS distance and PSI between the baseline and current label distributions (nulls ignored)."""
    base_counts = _label_counts(baseline)
    current_counts = _label_counts(current)
    expected = list(dict.fromkeys(labels))
    seen = set(base_counts["label"].to_list()) | set(current_counts["label"].to_list())
    unexpected = sorted(seen - set(expected))
    universe = pl.DataFrame({"label": expected + unexpected}, schema={"label": pl.String})
    aligned = (
        universe.join(
            base_counts.rename({"n": "n_base"}), on="label", how="left", maintain_order="left"
        )
        .join(
            current_counts.rename({"n": "n_current"}),
            on="label",
            how="left",
            maintain_order="left",
        )
        .fill_null(0)
    )
    n_base = int(aligned["n_base"].sum())
    n_current = int(aligned["n_current"].sum())
    absent = tuple(
        aligned.filter((pl.col("n_base") == 0) & (pl.col("n_current") > 0))["label"].to_list()
    )

    notes = []
    if n_base == 0:
        notes.append("no labels in the baseline")
    if n_current == 0:
        notes.append("no events in the current window")
    if expected and unexpected:
        notes.append(f"label(s) outside the expected set: {', '.join(unexpected)}")
    if absent and n_base > 0:
        notes.append(
            f"label(s) {', '.join(absent)} seen in the current window but never in the "
            f"baseline; PSI stays finite only because shares are smoothed by PSI_EPSILON="
            f"{PSI_EPSILON:g}, and those labels dominate it"
        )

    if n_base == 0 or n_current == 0:
        notes.append("drift is undefined without labels on both sides")
        per_label = aligned.select(
            "label",
            (pl.col("n_base") / n_base if n_base else pl.lit(None)).alias("baseline_share"),
            (pl.col("n_current") / n_current if n_current else pl.lit(None)).alias("current_share"),
            pl.lit(None).alias("psi_term"),
        ).cast(PER_LABEL_SCHEMA)
        return LabelDrift(None, None, n_base, n_current, per_label, absent, "; ".join(notes))

    # imported where used: loading the code location must not pay for scipy
    from scipy.spatial.distance import jensenshannon

    p = aligned["n_base"].to_numpy() / n_base
    q = aligned["n_current"].to_numpy() / n_current
    terms = _psi_terms(p, q)
    per_label = pl.DataFrame(
        {"label": universe["label"], "baseline_share": p, "current_share": q, "psi_term": terms},
        schema=PER_LABEL_SCHEMA,
    )
    return LabelDrift(
        js_distance=float(jensenshannon(p, q, base=2)),
        psi=float(terms.sum()),
        n_baseline=n_base,
        n_current=n_current,
        per_label=per_label,
        absent_from_baseline=absent,
        note="; ".join(notes) or None,
    )


def feature_drift(
    baseline: np.ndarray, current: np.ndarray, bins: int = 10, names: list[str] | None = None
) -> pl.DataFrame:
    """Per feature column: PSI on baseline quantile bins, Wasserstein distance, and notes."""
    import numpy as np
    base = _as_matrix(baseline, "baseline")
    cur = _as_matrix(current, "current")
    if base.shape[1] != cur.shape[1]:
        raise ValueError(
            f"baseline has {base.shape[1]} feature column(s) but current has {cur.shape[1]}: "
            "both must hold the same features in the same order"
        )
    n_features = base.shape[1]
    names = [f"f{j}" for j in range(n_features)] if names is None else list(names)
    if len(names) != n_features:
        raise ValueError(f"got {len(names)} feature name(s) for {n_features} feature column(s)")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    # Column-major copies so each feature is a contiguous slice.
    base_t = np.ascontiguousarray(base.T)
    cur_t = np.ascontiguousarray(cur.T)
    rows = [_feature_row(base_t[j], cur_t[j], bins) for j in range(n_features)]
    return pl.DataFrame(
        [(name, *row) for name, row in zip(names, rows, strict=True)],
        schema=FEATURE_SCHEMA,
        orient="row",
    )


def summarize_feature_drift(per_feature: pl.DataFrame, threshold: float = FEATURE_PSI_WARN) -> dict:
    """Counts and worst offenders over the output of `feature_drift`."""
    n_features = per_feature.height
    compared = per_feature.filter(pl.col("psi").is_not_null())
    drifted = compared.filter(pl.col("psi") > threshold).sort(
        ["psi", "feature"], descending=[True, False]
    )
    ratio = per_feature.select(
        pl.when(pl.col("baseline_std") > 0)
        .then(pl.col("wasserstein") / pl.col("baseline_std"))
        .max()
    ).item()

    notes = []
    if n_features == 0:
        notes.append("no features to compare")
    elif compared.is_empty():
        notes.append("no feature could be compared (each has an empty side)")
    elif compared.height < n_features:
        notes.append(
            f"{n_features - compared.height} of {n_features} feature(s) could not be compared "
            "(empty side)"
        )
    if drifted.height > MAX_DRIFTED_LISTED:
        notes.append(
            f"{drifted.height} features drifted; only the worst {MAX_DRIFTED_LISTED} are listed"
        )
    return {
        "n_features": n_features,
        "n_drifted": drifted.height,
        "max_psi": compared["psi"].max() if not compared.is_empty() else None,
        "mean_psi": compared["psi"].mean() if not compared.is_empty() else None,
        "max_wasserstein_std": ratio,
        "drifted": drifted["feature"].head(MAX_DRIFTED_LISTED).to_list(),
        "note": "; ".join(notes) or None,
    }


def _label_counts(values: pl.Series) -> pl.DataFrame:
    return (
        pl.DataFrame({"label": values.cast(pl.String)})
        .drop_nulls()
        .group_by("label")
        .agg(pl.len().cast(pl.Int64).alias("n"))
    )


def _psi_terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    import numpy as np
    k = len(p)
    p_s = (p + PSI_EPSILON) / (1.0 + k * PSI_EPSILON)
    q_s = (q + PSI_EPSILON) / (1.0 + k * PSI_EPSILON)
    return (q_s - p_s) * np.log(q_s / p_s)


def _as_matrix(values: np.ndarray, side: str) -> np.ndarray:
    import numpy as np
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix.reshape(-1, 1)
    if matrix.ndim != 2:
        raise ValueError(f"{side} must be a 2-D array (rows x features), got shape {matrix.shape}")
    return matrix


def _wasserstein(u_sorted: np.ndarray, v_sorted: np.ndarray) -> float:
    """scipy.stats.wasserstein_distance for two sorted, unweighted, non-empty samples."""
    import numpy as np
    # W1 = integral over t in (0, 1] of |U^-1(t) - V^-1(t)|. The quantile functions step at i/n
    # and j/m; on the common grid (integers over n*m, so exact) the integral is a sum, with no
    # searchsorted of one sample into the other: that is what keeps 100k x 16 fast. A stable
    # sort of the two sorted runs of steps is a merge; np.unique would sort them from scratch.
    n, m = u_sorted.size, v_sorted.size
    steps = np.concatenate([np.arange(1, n + 1) * m, np.arange(1, m + 1) * n])
    steps = np.sort(steps, kind="stable")
    steps = steps[np.diff(steps, prepend=0) > 0]
    u_at = u_sorted[(steps + m - 1) // m - 1]
    v_at = v_sorted[(steps + n - 1) // n - 1]
    return float(np.dot(np.abs(u_at - v_at), np.diff(steps, prepend=0)) / (n * m))


def _feature_row(
    base: np.ndarray, cur: np.ndarray, bins: int
) -> tuple[float | None, float | None, float | None, int, str | None]:
    """psi, wasserstein, baseline_std, n_nan_dropped, note for one feature."""
    import numpy as np
    base_ok = np.isfinite(base)
    cur_ok = np.isfinite(cur)
    dropped_base = int(base.size - base_ok.sum())
    dropped_cur = int(cur.size - cur_ok.sum())
    dropped = dropped_base + dropped_cur
    base = np.sort(base[base_ok])
    cur = np.sort(cur[cur_ok])

    notes = []
    if dropped:
        notes.append(
            f"{dropped} NaN/Inf value(s) dropped ({dropped_base} baseline, {dropped_cur} current)"
        )
    std = float(base.std()) if base.size else None
    if base.size == 0:
        notes.append("no finite values in the baseline")
    if cur.size == 0:
        notes.append("no finite values in the current window")
    if base.size == 0 or cur.size == 0:
        return None, None, std, dropped, "; ".join(notes)

    if base[0] == base[-1]:
        # Quantile cuts of a constant all coincide; three bins (below, at, above the value) let
        # a move in either direction show.
        edges = np.array([base[0], np.nextafter(base[0], np.inf)])
        notes.append(f"baseline is constant ({base[0]:g}): bins are below, at and above it")
    else:
        edges = np.unique(np.quantile(base, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
        if len(edges) + 1 < bins:
            notes.append(f"{len(edges) + 1} bins instead of {bins}: tied baseline quantiles merged")
    # Bin k holds [edge_{k-1}, edge_k), the outer bins open-ended; on sorted samples the counts
    # are differences of positions.
    p = np.diff(np.searchsorted(base, edges, side="left"), prepend=0, append=base.size)
    q = np.diff(np.searchsorted(cur, edges, side="left"), prepend=0, append=cur.size)
    psi = float(_psi_terms(p / base.size, q / cur.size).sum())
    return psi, _wasserstein(base, cur), std, dropped, "; ".join(notes) or None
