"""Trend charts for the Dagster UI: small PNGs embedded in markdown metadata."""

from __future__ import annotations

import base64
import io

import polars as pl


def quality_trends_png(agreement: pl.DataFrame, drift: pl.DataFrame, js_warn: float, psi_warn: float) -> bytes:
    """Agreement (alpha, kappa, difficult share) and drift (JS distance, feature PSI) over measurements."""
    # imported where used: loading the code location must not pay for matplotlib
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.2), dpi=80, sharex=False)
    for column, name in (("krippendorff_alpha", "Krippendorff's alpha"), ("fleiss_kappa", "Fleiss' kappa"),
                         ("difficult_prevalence", "difficult items (share)")):
        if column in agreement.columns:
            top.plot(range(1, agreement.height + 1), agreement[column].to_list(), marker="o", ms=3, label=name)
    top.axhline(0.667, color="grey", lw=0.8, ls="--", label="alpha 0.667 (tentative)")
    top.set_ylim(-1.05, 1.05)  # alpha and kappa go below zero when agreement is worse than chance
    top.set_title("Agreement among contributors")
    top.legend(fontsize=7, loc="lower left")
    for signal, column, name in (("predicted_labels", "js_distance", "predicted labels, JS distance"),
                                 ("corrected_labels", "js_distance", "corrected labels, JS distance"),
                                 ("served_features", "max_psi", "served features, max PSI")):
        series = drift.filter(pl.col("signal") == signal)[column] if drift.height else pl.Series([], dtype=pl.Float64)
        bottom.plot(range(1, len(series) + 1), series.to_list(), marker="o", ms=3, label=name)
    bottom.axhline(js_warn, color="tab:red", lw=0.8, ls="--", label=f"JS warn {js_warn}")
    bottom.axhline(psi_warn, color="tab:purple", lw=0.8, ls=":", label=f"feature PSI warn {psi_warn}")
    bottom.set_title("Drift: current window vs baseline")
    bottom.set_xlabel("measurement (oldest to newest)")
    bottom.legend(fontsize=7, loc="upper left")
    for axis, what, count in ((top, "agreement", agreement.height), (bottom, "drift", drift.height)):
        if not any(line.get_xydata().size and (line.get_xydata()[:, 1] == line.get_xydata()[:, 1]).any()
                   for line in axis.get_lines()[:3]):
            axis.text(0.6, 0.5, f"no {what} measured yet (see the notes in the metadata)",
                      transform=axis.transAxes, ha="center", va="center", color="grey")
        axis.set_xlim(0.5, max(count if what == "agreement" else count // 3, 1) + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """A PNG inlined as a data URI, which the Dagster UI's markdown metadata renders."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
