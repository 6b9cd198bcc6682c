"""The landing zone as external assets: lineage starts at the files producers deliver.

Nothing in labelloop materializes these; producers write them (temp name, then an atomic rename)
and the ingest assets read each new or changed file once.
"""

import dagster as dg

from labelloop_assets.core.settings import LANDING_KINDS

GROUP = "landing"

DESCRIPTIONS = {
    "items": "JSON Lines of items to label (item_id, text and/or features, an optional uri and initial label), "
    "dropped by "
    "producers in LABELLOOP_HOME/landing/items/ or a producer's subfolder.",
    "predictions": "The prediction log: what each model version served, per item, in "
    "LABELLOOP_HOME/landing/predictions/.",
    "corrections": "User corrections (who, which item, which label, consent) in "
    "LABELLOOP_HOME/landing/corrections/; claimed roles are capped by contributors.yaml.",
    "reviews": "Signed reviewer decisions (escalations decided, bursts released or discarded) in "
    "LABELLOOP_HOME/landing/reviews/, verified against the keys in contributors.yaml.",
}


# Named apart from the tables they feed (landing/item_files -> items): a key's last part is unique.
FILES_OF_KIND = {
    "items": "item_files", "predictions": "prediction_files", "corrections": "correction_files",
    "reviews": "review_files",
}


def landing_key(kind: str) -> dg.AssetKey:
    return dg.AssetKey(["landing", FILES_OF_KIND[kind]])


GOLD_FILE = dg.AssetKey(["landing", "gold_file"])

landing_files = [
    dg.AssetSpec(landing_key(kind), description=DESCRIPTIONS[kind], group_name=GROUP, kinds={"jsonl"},
                 owners=["team:labelloop"])
    for kind in LANDING_KINDS
] + [
    dg.AssetSpec(
        GOLD_FILE,
        description="LABELLOOP_HOME/gold.jsonl: the deployment's evaluation set; only this file declares gold "
        "labels, and each edit declares a new evaluation set.",
        group_name=GROUP,
        kinds={"jsonl"},
        owners=["team:labelloop"],
    )
]
