"""The README and the documentation site: short enough to read, no dead links, and generated
reference pages that cover the code they are generated from."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets.cli import build_parser
from labelloop_assets.core.settings import Home
from labelloop_assets.definitions import build_definitions

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
README_LIMIT = 12_000

# [text](target) and ![alt](target); a target may carry a title after a space.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCED_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _load_hook():
    """The MkDocs hook module, loaded from its file as MkDocs loads it."""
    path = REPO_ROOT / "docs_hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("docs_reference_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def relative_links(markdown: str) -> list[str]:
    """Link targets outside code that point into the repository (no scheme, not a bare anchor)."""
    prose = INLINE_CODE.sub("", FENCED_BLOCK.sub("", markdown))
    targets = [m.group(1) for m in MARKDOWN_LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_short_enough_to_read():
    length = len(README.read_text(encoding="utf-8"))
    assert length <= README_LIMIT, f"README.md has {length:,} characters; at most {README_LIMIT:,}"


def test_readme_keeps_the_test_command_ci_runs():
    # CI runs the README's test command (.ci/run): it must stay exactly `make test`.
    assert re.search(r"^make test\b", README.read_text(encoding="utf-8"), re.MULTILINE)


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(page):
    missing = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO_ROOT)} links to missing files: {missing}"


def test_the_link_check_finds_a_dead_link():
    links = relative_links("See [a](docs/nowhere.md#x), `[b](c.md)`, [web](https://x.org), [top](#top).")
    assert links == ["docs/nowhere.md#x"]
    assert not (REPO_ROOT / "docs" / "nowhere.md").exists()


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and every subcommand's parser under it, walked independently of the hook."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def _sections(reference: str) -> dict[str, str]:
    """The reference split by its command headings: prog -> that command's text."""
    parts = re.split(r"^#+ `([^`]+)`$", reference, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_generated_cli_reference_names_every_subcommand_and_option():
    parser = build_parser()
    sections = _sections(_load_hook().cli_reference_markdown(parser))
    progs = [p.prog for p in _parsers(parser)]
    assert "labelloop review decide" in progs and "labelloop secret check" in progs
    missing = [prog for prog in progs if prog not in sections]
    assert not missing, f"the CLI reference lacks {missing}"
    for command in _parsers(parser):
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in sections[command.prog], f"{command.prog}: {flag} not listed"
            if action.help and action.help != argparse.SUPPRESS and not isinstance(
                    action, argparse._SubParsersAction) and not action.option_strings == ["-h", "--help"]:
                first_word = re.sub(r"[^A-Za-z0-9 ]", " ", action.help).split()[0]
                assert first_word in sections[command.prog], f"{command.prog}: help of {action.dest} missing"


def test_generated_cli_reference_states_a_default_or_the_choices_once():
    reference = _load_hook().cli_reference_markdown(build_parser())
    assert "- `--days N`: simulated days after the first (default: 6)\n" in reference
    queue = next(line for line in reference.splitlines() if line.startswith("- `--queue"))
    assert queue.endswith("which queue: escalations, bursts, issues (default: escalations)"), queue
    # Help text that does not say them still gets the choices and the default added.
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--colour", choices=["red", "blue"], default="red", help="the colour")
    assert "- `--colour {red,blue}`: the colour; one of `red`, `blue`; default `red`" in (
        _load_hook().cli_reference_markdown(parser))


def test_generated_asset_graph_has_every_asset_and_dependency(tmp_path):
    graph = build_definitions(Home(tmp_path / "home")).resolve_asset_graph()
    hook = _load_hook()
    diagram = hook.asset_graph_mermaid(graph)
    assert diagram.startswith("```mermaid\nflowchart")
    edges = set(re.findall(r"^\s*(\w+) --> (\w+)$", diagram, re.MULTILINE))
    for key in graph.get_all_asset_keys():
        assert f"[{key.to_user_string()}]" in diagram
        for parent in graph.get(key).parent_keys:
            assert (hook._node_id(parent), hook._node_id(key)) in edges
    # The dependencies the hand-drawn graph once got wrong.
    assert ("asset_model_evaluation", "asset_release_notes") in edges
    assert ("asset_retrained_model", "asset_label_quality_metrics") not in edges
    # Lineage starts at the landing zone's files.
    assert (hook._node_id(dg.AssetKey(["landing", "correction_files"])), "asset_raw_corrections") in edges


def _makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_-]+):(?!=)", text, re.MULTILINE))


def test_every_make_target_the_readme_names_exists():
    readme = README.read_text(encoding="utf-8")
    named = set(re.findall(r"`make ([A-Za-z0-9_-]+)", readme))
    named |= set(re.findall(r"^make ([A-Za-z0-9_-]+)", readme, re.MULTILINE))
    assert {"demo", "test", "docs"} <= named
    missing = named - _makefile_targets()
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


def test_make_test_builds_the_docs_first():
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    prerequisites = re.search(r"^test:(.*)$", makefile, re.MULTILINE).group(1).split()
    assert "docs" in prerequisites
    assert re.search(r"^docs:.*\n\t.*mkdocs build --strict", makefile, re.MULTILINE)


def test_generated_asset_table_lists_each_assets_jobs_and_checks(tmp_path):
    defs = build_definitions(Home(tmp_path / "home"))
    graph = defs.resolve_asset_graph()
    rows = {
        cells[1].strip("` "): cells
        for cells in (line.split("|") for line in _load_hook().asset_table_markdown(defs, graph).splitlines()[2:])
    }
    assert set(rows) == {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert "`ingest_job`" in rows["label_quality_metrics"][4] and "`retrain_job`" in rows["label_quality_metrics"][4]
    assert "`production_corpus_schema` (blocking)" in rows["production_corpus"][5]
    assert rows["release_notes"][3].strip() == "`model_evaluation`"


def test_the_layout_page_names_every_core_module():
    """docs/layout.md lists what each module of core/ holds; a new module must be listed there."""
    layout = (REPO_ROOT / "docs" / "layout.md").read_text()
    core = REPO_ROOT / "labelloop_assets" / "core"
    missing = [p.stem for p in sorted(core.glob("*.py"))
               if p.stem != "__init__" and not re.search(rf"\b{p.stem}\b", layout)]
    assert not missing, f"docs/layout.md does not name core modules {missing}"
