"""The label set and the renames that harmonize old terms to current ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from labelloop_assets.core.settings import LabelloopConfigError, load_yaml_mapping


@dataclass(frozen=True)
class Ontology:
    labels: tuple[str, ...]
    renames: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.labels:
            raise LabelloopConfigError("ontology: `labels` must list at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise LabelloopConfigError("ontology: `labels` contains duplicates")
        for old, new in self.renames.items():
            if old in self.labels:
                raise LabelloopConfigError(
                    f"ontology: rename source {old!r} is still a current label; remove it from "
                    "`labels` or drop the rename"
                )
            if self.resolve_term(new) not in self.labels:
                raise LabelloopConfigError(
                    f"ontology: rename {old!r} -> {new!r} does not end at a current label"
                )

    def resolve_term(self, term: str) -> str:
        """Follow a chain of renames (a -> b -> c) to its end; cycles are a config error."""
        seen = {term}
        while term in self.renames:
            term = self.renames[term]
            if term in seen:
                raise LabelloopConfigError(f"ontology: renames form a cycle through {term!r}")
            seen.add(term)
        return term

    @property
    def rename_map(self) -> dict[str, str]:
        """Every old term mapped straight to its current term."""
        return {old: self.resolve_term(old) for old in self.renames}

    def harmonize(self, column: str) -> pl.Expr:
        """Map old terms to current ones; labels outside the ontology become null."""
        expr = pl.col(column).str.strip_chars().replace(self.rename_map)
        return pl.when(expr.is_in(list(self.labels))).then(expr).otherwise(None)

    @classmethod
    def load(cls, path: Path) -> Ontology:
        raw = load_yaml_mapping(path, "ontology")
        labels = raw.get("labels") or []
        renames = raw.get("renames") or {}
        if not isinstance(labels, list) or not isinstance(renames, dict):
            raise LabelloopConfigError(
                f"ontology file {path}: `labels` must be a list and `renames` a mapping"
            )
        # YAML reads `7` as a number, which is a fine label; null, true or an empty name is not.
        bad = [
            label for label in labels
            if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip()
        ]
        if bad:
            raise LabelloopConfigError(
                f"ontology file {path}: every label must be a non-empty name, got {bad!r}"
            )
        return cls(
            labels=tuple(str(label).strip() for label in labels),
            renames={str(old): str(new) for old, new in renames.items()},
        )
