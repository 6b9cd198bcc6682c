"""Inter-annotator agreement: Krippendorff's alpha, Fleiss' kappa and pairwise Cohen's kappa.

Input. A ratings frame with columns item_id, rater, label (cast to strings). Rows with a null in
any of them are ignored. The caller is expected to keep one rating per (item_id, rater); should a
pair repeat anyway, only its last row in frame order counts (a rater's latest word on the item).

Item-level statistics use only the items rated by two or more raters: a lone rating cannot agree
or disagree with anything. `n_items` and `n_ratings` report what was used. When a statistic is
undefined (no ratings, no item with two raters, a single label used throughout) its value is None
and `note` says why; it is never reported as 0.

Krippendorff's alpha (nominal) comes from the coincidence matrix
    o_ck = sum_u (n_uc n_uk - [c == k] n_uc) / (m_u - 1),   n_c = sum_k o_ck,   n = sum_c n_c,
    alpha = 1 - (n - 1) (n - sum_c o_cc) / (n^2 - sum_c n_c^2),
where n_uc counts the ratings of value c on unit u and m_u the ratings on u. Only the diagonal
and the margins are needed, and n_c reduces to sum_u n_uc, so everything is a sum over the
per-(item, label) counts; no units x values matrix is built.

Fleiss' kappa is generalized to a varying number of raters per item:
    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)),   P_bar = mean_i P_i,
    p_j = sum_i n_ij / sum_i n_i,   P_e = sum_j p_j^2,   kappa = (P_bar - P_e) / (1 - P_e).
Each item weighs the same in P_bar whatever its number of raters, while p_j pools all ratings.
When every item has the same number of raters this is exactly Fleiss' (1971) kappa.

Cohen's kappa is computed per rater pair on the items both rated, for the pairs with the most
items in common.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

RATINGS_COLUMNS = ("item_id", "rater", "label")
PAIR_SCHEMA = {
    "rater_a": pl.String,
    "rater_b": pl.String,
    "n_shared": pl.Int64,
    "kappa": pl.Float64,
    "note": pl.String,
}


@dataclass(frozen=True)
class Statistic:
    """An agreement statistic, how much data it rests on, and why it is None when it is."""

    value: float | None
    n_items: int  # items with >= 2 ratings used
    n_ratings: int  # ratings on those items
    note: str | None = None


def krippendorff_alpha_nominal(ratings: pl.DataFrame) -> Statistic:
    """Krippendorff's alpha for nominal labels over the items rated by two or more raters."""
    return _alpha(_pairable_counts(_clean(ratings)))


def fleiss_kappa(ratings: pl.DataFrame) -> Statistic:
    """Fleiss' kappa, generalized to items with different numbers of raters (see module doc)."""
    return _fleiss(_pairable_counts(_clean(ratings)))


def cohen_kappa_pairs(ratings: pl.DataFrame, top: int = 5, min_shared: int = 10) -> pl.DataFrame:
    """Cohen's kappa for the `top` rater pairs sharing the most items (at least `min_shared`)."""
    clean = _clean(ratings)
    if top <= 0 or clean.is_empty():
        return pl.DataFrame(schema=PAIR_SCHEMA)
    left = clean.rename({"rater": "rater_a", "label": "label_a"})
    right = clean.rename({"rater": "rater_b", "label": "label_b"})
    shared = left.join(right, on="item_id", how="inner").filter(
        pl.col("rater_a") < pl.col("rater_b")
    )
    pairs = (
        shared.group_by("rater_a", "rater_b")
        .agg(
            pl.len().cast(pl.Int64).alias("n_shared"),
            (pl.col("label_a") == pl.col("label_b")).sum().cast(pl.Int64).alias("n_agree"),
            pl.col("label_a").first().alias("some_label"),
        )
        .filter(pl.col("n_shared") >= min_shared)
        .sort(["n_shared", "rater_a", "rater_b"], descending=[True, False, False])
        .head(top)
    )
    if pairs.is_empty():
        return pl.DataFrame(schema=PAIR_SCHEMA)

    keys = ["rater_a", "rater_b"]
    shared = shared.join(pairs.select(keys), on=keys, how="semi")
    margin_a = shared.group_by(*keys, pl.col("label_a").alias("label")).agg(
        pl.len().cast(pl.Int64).alias("count_a")
    )
    margin_b = shared.group_by(*keys, pl.col("label_b").alias("label")).agg(
        pl.len().cast(pl.Int64).alias("count_b")
    )
    # sum_l count_a(l) * count_b(l), kept integral so "chance agreement is total" is exact.
    chance = (
        margin_a.join(margin_b, on=[*keys, "label"], how="inner")
        .group_by(keys)
        .agg((pl.col("count_a") * pl.col("count_b")).sum().alias("chance_products"))
    )
    n = pl.col("n_shared")
    degenerate = pl.col("chance_products") == n * n
    p_observed = pl.col("n_agree") / n
    p_chance = pl.col("chance_products") / (n * n)
    return (
        pairs.join(chance, on=keys, how="left", maintain_order="left")
        .with_columns(pl.col("chance_products").fill_null(0))
        .select(
            *keys,
            "n_shared",
            pl.when(degenerate)
            .then(None)
            .otherwise((p_observed - p_chance) / (1.0 - p_chance))
            .cast(pl.Float64)
            .alias("kappa"),
            pl.when(degenerate)
            .then(
                pl.format(
                    "both raters used only the label '{}' on their {} shared items, so chance "
                    "agreement is total and kappa is undefined",
                    pl.col("some_label"),
                    n,
                )
            )
            .cast(pl.String)
            .alias("note"),
        )
    )


def agreement_summary(ratings: pl.DataFrame) -> dict:
    """Alpha, kappa, the number of items with two or more raters and the number of raters."""
    clean = _clean(ratings)
    counts = _pairable_counts(clean)
    return {
        "krippendorff_alpha": _alpha(counts),
        "fleiss_kappa": _fleiss(counts),
        "n_items_multi": counts.n_items,
        "n_raters": clean["rater"].n_unique(),
    }


@dataclass(frozen=True)
class _PairableCounts:
    """Per-(item, label) counts on the items with >= 2 ratings, or why there is nothing to use."""

    counts: pl.DataFrame  # item_id, label, n (ratings of the label on the item), m (on the item)
    n_items: int
    n_ratings: int
    undefined: str | None


def _clean(ratings: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in RATINGS_COLUMNS if c not in ratings.columns]
    if missing:
        raise ValueError(
            f"ratings frame lacks column(s) {missing}: expected item_id, rater, label, "
            f"got {ratings.columns}"
        )
    return (
        ratings.select(pl.col(c).cast(pl.String) for c in RATINGS_COLUMNS)
        .drop_nulls()
        .unique(subset=["item_id", "rater"], keep="last", maintain_order=True)
    )


def _pairable_counts(clean: pl.DataFrame) -> _PairableCounts:
    counts = (
        clean.group_by("item_id", "label")
        .agg(pl.len().cast(pl.Int64).alias("n"))
        .with_columns(pl.col("n").sum().over("item_id").alias("m"))
        .filter(pl.col("m") >= 2)
    )
    n_items = counts["item_id"].n_unique()
    n_ratings = int(counts["n"].sum())
    labels = counts["label"].unique().sort()
    if clean.is_empty():
        undefined = "no ratings (rows with a null item_id, rater or label are ignored)"
    elif counts.is_empty():
        n_single = clean["item_id"].n_unique()
        undefined = (
            f"no item has two or more contributors ({n_single} item(s), each rated by a "
            "single contributor)"
        )
    elif len(labels) == 1:
        undefined = (
            f"only one label ('{labels[0]}') was used on the {n_items} item(s) with two or more "
            "contributors, so chance agreement is total and the statistic is undefined"
        )
    else:
        undefined = None
    return _PairableCounts(counts, n_items, n_ratings, undefined)


def _alpha(pc: _PairableCounts) -> Statistic:
    if pc.undefined is not None:
        return Statistic(None, pc.n_items, pc.n_ratings, pc.undefined)
    n_c = pc.counts.group_by("label").agg(pl.col("n").sum())["n"].cast(pl.Float64)
    n = float(n_c.sum())
    diagonal = pc.counts.select((pl.col("n") * (pl.col("n") - 1) / (pl.col("m") - 1)).sum()).item()
    alpha = 1.0 - (n - 1.0) * (n - diagonal) / (n * n - float((n_c * n_c).sum()))
    return Statistic(alpha, pc.n_items, pc.n_ratings)


def _fleiss(pc: _PairableCounts) -> Statistic:
    if pc.undefined is not None:
        return Statistic(None, pc.n_items, pc.n_ratings, pc.undefined)
    p_bar = (
        pc.counts.group_by("item_id")
        .agg((pl.col("n") * pl.col("n")).sum().alias("squares"), pl.col("m").first())
        .select(((pl.col("squares") - pl.col("m")) / (pl.col("m") * (pl.col("m") - 1))).mean())
        .item()
    )
    p_j = pc.counts.group_by("label").agg(pl.col("n").sum())["n"] / pc.n_ratings
    p_e = float((p_j * p_j).sum())
    return Statistic((p_bar - p_e) / (1.0 - p_e), pc.n_items, pc.n_ratings)
