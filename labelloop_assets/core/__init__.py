"""Pure logic on Polars frames and DuckDB SQL. Nothing in this package imports Dagster."""
