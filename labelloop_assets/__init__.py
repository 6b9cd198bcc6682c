"""labelloop: continuous labeling feedback loops as a Dagster code location."""
