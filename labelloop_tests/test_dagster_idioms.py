"""The code location as Dagster sees it: attributes, schemas, lineage, checks and automation."""

from __future__ import annotations

import dagster as dg

from labelloop_tests.conftest import RETRAIN


def _graph(defs: dg.Definitions):
    return defs.resolve_asset_graph()


def _materializable(defs: dg.Definitions) -> list:
    graph = _graph(defs)
    return [graph.get(key) for key in graph.materializable_asset_keys]


def test_every_asset_declares_its_code_version_owners_and_pool(defs):
    assets = _materializable(defs)
    assert len(assets) >= 18
    for node in assets:
        name = node.key.to_user_string()
        assert node.code_version, f"{name} has no code_version"
        assert node.owners == ["team:labelloop"], name
        assert node.pools == {"duckdb"}, name
    groups = {node.key.to_user_string(): node.group_name for node in assets}
    # Each keeps its own group while sharing the rest.
    assert (groups["items"], groups["production_corpus"], groups["retrained_model"],
            groups["label_quality_metrics"], groups["store_maintenance"]) == (
        "ingest", "curation", "training", "monitoring", "maintenance")
