"""MkDocs hook: pages generated from the code at build time, so they cannot drift from it.

- docs/cli.md: `<!-- generated: cli-reference -->` becomes the reference of every `labelloop`
  command, walked from `labelloop_assets.cli.build_parser()`.
- docs/assets.md: `<!-- generated: asset-graph -->` becomes a Mermaid diagram of the asset
  dependencies and `<!-- generated: asset-table -->` a table of every asset with its group, its
  jobs, its checks and its one-line description, read from the code location's Definitions.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import tempfile
from collections.abc import Iterator

CLI_MARKER = "<!-- generated: cli-reference -->"
GRAPH_MARKER = "<!-- generated: asset-graph -->"
TABLE_MARKER = "<!-- generated: asset-table -->"

# Characters Markdown would read as formatting inside help text written for a terminal.
_MARKDOWN_SPECIAL = re.compile(r"([\\*_\[\]{}|#])")
# Help text may quote code in backticks: those spans are kept as they are.
_CODE_SPAN = re.compile(r"(`[^`]*`)")
# Usage lines are wrapped at this width, whatever the terminal that builds the docs.
USAGE_COLUMNS = "100"


def _text(value: str) -> str:
    """Terminal help text as literal Markdown (no accidental emphasis, links or table cells)."""
    parts = _CODE_SPAN.split(" ".join(value.split()))
    return "".join(
        part if part.startswith("`") and part.endswith("`") and len(part) > 1
        else _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(part, quote=False))
        for part in parts)


def command_parsers(parser: argparse.ArgumentParser, summary: str = "") -> Iterator[
        tuple[argparse.ArgumentParser, str]]:
    """Every parser under `parser`, depth first, with the one-line help its parent gives it."""
    yield parser, summary
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, child in action.choices.items():
                yield from command_parsers(child, helps.get(name, ""))


def _argument_name(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(action.option_strings)
        if action.nargs == 0:
            return names
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
        return f"{names} {metavar}"
    return action.metavar or action.dest  # as argparse shows a positional


def _argument_line(command: argparse.ArgumentParser, action: argparse.Action) -> str:
    facts, said = [], ""
    if action.help and action.help != argparse.SUPPRESS:
        # As in `--help`: argparse expands %(default)s and friends in help text.
        said = command._get_formatter()._expand_help(action)
        facts.append(_text(said))
    # The choices and the default are added only where the help text does not already state them.
    if action.choices and not isinstance(action, argparse._SubParsersAction) and not _states_choices(
            said, action.choices):
        facts.append("one of " + ", ".join(f"`{choice}`" for choice in action.choices))
    if action.option_strings and action.required:
        facts.append("required")
    if (action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
            and not _states_default(said, action.default)):
        facts.append(f"default `{action.default}`")
    return f"- `{_argument_name(action)}`" + (": " + "; ".join(facts) if facts else "")


def _states_choices(help_text: str, choices) -> bool:
    """Whether the help text already names every choice."""
    return all(re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", help_text) for choice in choices)


def _states_default(help_text: str, default) -> bool:
    """Whether the help text already gives the default ("default: 6", "default 6")."""
    return re.search(rf"\bdefaults?:? `?{re.escape(str(default))}`?(?![\w-])", help_text) is not None


def _usage(command: argparse.ArgumentParser) -> str:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_COLUMNS
    try:
        return command.format_usage().removeprefix("usage: ").strip()
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def cli_reference_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The reference of every command the parser defines: usage, description and every option."""
    if parser is None:
        from labelloop_assets.cli import build_parser

        parser = build_parser()
    sections = []
    for command, summary in command_parsers(parser):
        depth = command.prog.count(" ")
        lines = [f"{'#' * min(depth + 2, 6)} `{command.prog}`", ""]
        about = summary or command.description or ""
        if about and depth:
            lines += [_text(about), ""]
        elif command.description:
            lines += [_text(command.description), ""]
        usage = _usage(command)
        lines += ["```text", usage, "```", ""]
        arguments = [a for a in command._actions
                     if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        positionals = [a for a in arguments if not a.option_strings]
        options = [a for a in arguments if a.option_strings]
        if positionals:
            lines += ["Arguments:", ""] + [_argument_line(command, a) for a in positionals] + [""]
        if options:
            lines += ["Options:", ""] + [_argument_line(command, a) for a in options] + [""]
        children = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if children:
            names = [f"`{command.prog} {name}`" for name in children[0].choices]
            lines += ["Subcommands: " + ", ".join(names) + ".", ""]
        sections.append("\n".join(lines))
    return "\n".join(sections)


def load_asset_graph():
    """The code location's asset graph, built on a throwaway home so nothing real is touched.

    Importing the code location binds it to LABELLOOP_HOME; an empty temporary folder stands in
    for it, and the variable is restored afterwards.
    """
    saved = os.environ.get("LABELLOOP_HOME")
    with tempfile.TemporaryDirectory(prefix="labelloop-docs-") as home:
        os.environ["LABELLOOP_HOME"] = home
        try:
            from labelloop_assets import definitions

            return definitions.defs, definitions.defs.resolve_asset_graph()
        finally:
            if saved is None:
                os.environ.pop("LABELLOOP_HOME", None)
            else:
                os.environ["LABELLOOP_HOME"] = saved


def _node_id_text(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _node_id(key) -> str:
    return "asset_" + _node_id_text(key.to_user_string())


def _depths(graph) -> dict:
    """Each asset's distance from the sources of the graph (its longest chain of parents)."""
    depths: dict = {}

    def depth(key) -> int:
        if key not in depths:
            parents = graph.get(key).parent_keys
            depths[key] = 1 + max((depth(p) for p in parents), default=-1)
        return depths[key]

    for key in graph.get_all_asset_keys():
        depth(key)
    return depths


def _group_ranks(graph) -> dict[str, int]:
    """Groups in the order data flows through them (by their assets' mean depth); a group with
    no dependencies at all comes last."""
    depths = _depths(graph)
    groups: dict[str, list] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name or "default", []).append(key)

    def order(name: str):
        members = groups[name]
        connected = any(graph.get(k).parent_keys or graph.get(k).child_keys for k in members)
        return (not connected, sum(depths[k] for k in members) / len(members), name)

    return {name: rank for rank, name in enumerate(sorted(groups, key=order))}


def asset_graph_mermaid(graph=None) -> str:
    """A Mermaid flowchart of every asset, boxed by its Dagster group, with an edge per dependency.

    Groups come in the order data flows through them (`_group_ranks`), so the diagram reads
    from intake to monitoring.
    """
    if graph is None:
        _, graph = load_asset_graph()
    depths = _depths(graph)
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: (depths[k], k.to_user_string()))
    groups: dict[str, list] = {}
    for key in keys:
        groups.setdefault(graph.get(key).group_name or "default", []).append(key)
    lines = ["```mermaid", "flowchart LR"]
    rank = _group_ranks(graph)
    for group, members in sorted(groups.items(), key=lambda item: rank[item[0]]):
        lines.append(f"  subgraph group_{_node_id_text(group)} [{group}]")
        lines += [f"    {_node_id(k)}[{k.to_user_string()}]" for k in members]
        lines.append("  end")
    for key in keys:
        for parent in sorted(graph.get(key).parent_keys, key=lambda k: k.to_user_string()):
            lines.append(f"  {_node_id(parent)} --> {_node_id(key)}")
    lines.append("```")
    return "\n".join(lines)


def asset_table_markdown(defs=None, graph=None) -> str:
    """Every asset with its group, what it depends on, the jobs that materialize it, its checks and
    its description: the graph's facts as text, readable where the diagram is not drawn."""
    if graph is None:
        defs, graph = load_asset_graph()
    jobs: dict = {}
    for job in defs.resolve_all_job_defs():
        if job.name.startswith("__"):  # Dagster's implicit job of all assets
            continue
        for key in job.asset_layer.selected_asset_keys:
            jobs.setdefault(key, []).append(job.name)
    checks: dict = {}
    for check_key in graph.asset_check_keys:
        spec = graph.get_check_spec(check_key)
        checks.setdefault(check_key.asset_key, []).append(
            f"`{check_key.name}`" + (" (blocking)" if spec.blocking else ""))
    rows = ["| asset | group | depends on | jobs | checks | what it is |", "|---|---|---|---|---|---|"]
    rank, depths = _group_ranks(graph), _depths(graph)
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: (
            rank[graph.get(k).group_name or "default"], depths[k], k.to_user_string())):
        node = graph.get(key)
        rows.append("| `{}` | {} | {} | {} | {} | {} |".format(
            key.to_user_string(), node.group_name or "",
            ", ".join(f"`{p.to_user_string()}`" for p in sorted(
                node.parent_keys, key=lambda k: k.to_user_string())) or "none",
            ", ".join(f"`{j}`" for j in sorted(jobs.get(key, []))) or "none",
            ", ".join(sorted(checks.get(key, []))) or "none",
            _text((node.description or "").strip().splitlines()[0] if node.description else "")))
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the generation markers of the CLI and asset pages with their generated text."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference_markdown())
    if GRAPH_MARKER in markdown or TABLE_MARKER in markdown:
        defs, graph = load_asset_graph()
        markdown = markdown.replace(GRAPH_MARKER, asset_graph_mermaid(graph))
        markdown = markdown.replace(TABLE_MARKER, asset_table_markdown(defs, graph))
    return markdown
