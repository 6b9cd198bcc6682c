"""No input makes `labelloop` print a traceback: every subcommand (found by walking the parser) is
run as a real process with hostile and odd arguments, without a home, on an empty home, and with
its standard output closed, and must end with a message and a documented exit code.

Exit codes: 0 done, 1 nothing to show or cannot read, 2 bad usage or configuration, 3 refused
(a review or rollback attempt, a statement that is not a query); 141 when the reader of its output
went away (as a shell reports a process ended by SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pytest

from labelloop_assets import cli
from labelloop_assets.definitions import build_definitions
from labelloop_tests.conftest import RETRAIN, leaf_commands, prepared_home, set_yaml
from labelloop_tests.test_loop import _materialize

# About 30 s of CPU in real subprocesses: `make test` runs it, `make test-fast` does not.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples" / "landing"
EXITS = {0, 1, 2, 3}
CLOSED_PIPE_EXITS = EXITS | {cli.BROKEN_PIPE_EXIT}

# What a well-meaning user would type, per argument (dest); anything else gets "x".
BENIGN = {"item_id": "sample-04", "escalation_id": "esc-sample-04-1", "label": "one", "rationale": "checked the scan",
          "reviewer": "reviewer-0", "version": "m0001", "query": "SELECT item_id FROM items",
          "contributor_id": "reviewer-0", "size": "5"}
# Text for every text argument at once: terminal escapes, quotes, shell and SQL syntax, wide and
# right-to-left characters; then bytes that are not UTF-8 (kept by Python as lone surrogates) in a
# long value; then nothing at all.
HOSTILE_TEXT = {
    "escapes": "\x1b[2J\x1b[31m\x07 ü✓ 日本語 🙂 \u202e ' OR 1=1 -- $(touch canary) %s {0}\r\t",
    "undecodable": os.fsdecode(b"bad-\xff\xfe-") + "y" * 5_000,
    "empty": "",
}
ODD_NUMBERS = ["-3", "0", "99999999999999999999999999", "1e3"]


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments that take a value (flags like --json and --help take none)."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, argparse._SubParsersAction)]


def _is_text(action: argparse.Action) -> bool:
    return action.type is None and action.choices is None


def _argv(path, parser, values: dict[str, str] | None = None) -> list[str]:
    """The command with `values` (by dest) for the arguments named there, and a benign value for
    every other argument that is required."""
    values = values or {}
    argv = list(path)
    for action in _arguments(parser):
        value = values.get(action.dest)
        if value is None and (action.required or not action.option_strings):
            value = BENIGN.get(action.dest, "x")
        if value is None:
            continue
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


LEAVES = list(leaf_commands(cli.build_parser()))


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory) -> Path:
    """A home the loop has run on once (the sample landing files), shared by every case here."""
    home = prepared_home(tmp_path_factory.mktemp("cli") / "home")
    shutil.copytree(SAMPLES, home.landing, dirs_exist_ok=True)
    set_yaml(home.governance_file, {"newcomers": {"min_history": 0}})
    with dg.instance_for_test() as instance:
        assert _materialize(build_definitions(home, RETRAIN), instance).success
    return home.root


def _environment(home: Path, scratch: Path, encoding: str) -> dict[str, str]:
    # No DAGSTER_HOME (so `demo` stops before it runs), no lake, no secret: the plain embedded home.
    dropped = {"DAGSTER_HOME", "LABELLOOP_CATALOG", "LABELLOOP_READER_CATALOG", "LABELLOOP_SECRET",
               "LABELLOOP_SIGNING_KEY", "COLUMNS"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               LABELLOOP_HOME=str(home), LABELLOOP_KEYS_DIR=str(scratch / "keys"),
               LABELLOOP_ALLOW_DEVELOPMENT_SECRET="1", PYTHONIOENCODING=encoding)
    return env


def _run(argv: list[str], home: Path, scratch: Path, closed_stdout: bool = False, encoding: str = "utf-8"):
    """Run `labelloop ARGV` in a fresh interpreter; with closed_stdout, the reader of its standard
    output has gone away before it writes (as `labelloop ... | head -0` would leave it)."""
    command = [sys.executable, "-m", "labelloop_assets.cli", *(os.fsencode(a) for a in argv)]
    env = _environment(home, scratch, encoding)
    if not closed_stdout:
        done = subprocess.run(command, env=env, cwd=scratch, capture_output=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails with EPIPE
    try:
        done = subprocess.run(command, env=env, cwd=scratch, stdout=write,
                              stderr=subprocess.PIPE, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
    return done.returncode, "", done.stderr.decode("utf-8", "replace")


def _check(case: str, argv: list[str], result, exits=EXITS) -> list[str]:
    code, out, err = result
    argv = [a if len(a) < 60 else f"{a[:40]}... ({len(a)} characters)" for a in argv]
    problems = []
    if "Traceback" in err or "Exception ignored" in err:
        problems.append(f"{case}: {argv[:3]} printed a traceback:\n{err[-1500:]}")
    if code not in exits:
        problems.append(f"{case}: {argv[:3]} exited {code}, not one of {sorted(exits)}:\n{err[-500:]}")
    if code != 0 and not err.strip() and code != cli.BROKEN_PIPE_EXIT:
        problems.append(f"{case}: {argv[:3]} failed ({code}) without saying why")
    if "\x1b" in out + err:
        problems.append(f"{case}: {argv[:3]} passed a terminal escape through")
    return problems


def _in_parallel(cases, home_of, scratch: Path, closed_stdout: bool = False, exits=EXITS) -> list[str]:
    """Each case (name, argv) run as its own process, two at a time (the test machine's cores)."""
    def one(case):
        name, argv = case
        # Hostile text also meets a terminal that can show only ASCII.
        encoding = "ascii" if name.startswith("escapes") else "utf-8"
        return _check(name, argv, _run(argv, home_of(name), scratch, closed_stdout, encoding), exits)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return [problem for problems in pool.map(one, cases) for problem in problems]


def test_the_parser_walk_finds_every_command():
    commands = {" ".join(path) for path, _ in LEAVES}
    assert {"demo", "status", "quarantine", "lineage", "sql", "migrate", "review list", "review show",
            "review decide", "model list", "model rollback", "keys new", "keys list", "secret new",
            "secret check"} <= commands, commands


# Each process costs about half a second of the test machine's two cores: every command gets every
# kind of trouble, but the values of one kind take turns across commands rather than each running
# with all of them (the in-process suites, test_injection and test_cli, try more values).
def test_hostile_text_in_every_argument_of_every_command(demo_home, tmp_path):
    cases = []
    texted = [(path, parser, [a.dest for a in _arguments(parser) if _is_text(a)]) for path, parser in LEAVES]
    for turn, (path, parser, text) in enumerate(leaf for leaf in texted if leaf[2]):
        for name in ("escapes", ("undecodable", "empty")[turn % 2]):
            cases.append((f"{name} {' '.join(path)}", _argv(path, parser, dict.fromkeys(text, HOSTILE_TEXT[name]))))
    assert len(cases) >= 20
    problems = _in_parallel(cases, lambda name: demo_home, tmp_path)
    assert not problems, "\n\n".join(problems)


def test_odd_numbers_and_choices_are_refused_with_a_message(demo_home, tmp_path):
    cases = []
    for path, parser in LEAVES:
        for action in _arguments(parser):
            if action.type is not None and action.option_strings:
                value = ODD_NUMBERS[len(cases) % len(ODD_NUMBERS)]
                if action.dest == "seed" and value == "0":
                    value = "-3"  # 0 is a seed like any other
                cases.append((f"number {value} {' '.join(path)}", _argv(path, parser, {action.dest: value})))
            elif action.choices is not None and action.option_strings:
                cases.append((f"choice {' '.join(path)}", _argv(path, parser, {action.dest: "no-such-choice"})))
    assert len(cases) >= len(ODD_NUMBERS) + 2
    problems = _in_parallel(cases, lambda name: demo_home, tmp_path, exits={2})
    assert not problems, "\n\n".join(problems)


def test_every_command_without_a_home_or_on_an_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [(f"{('missing', 'empty')[turn % 2]} {' '.join(path)}", _argv(path, parser))
             for turn, (path, parser) in enumerate(LEAVES)]
    # A missing home is a folder that does not exist, one per case (a review attempt creates it).
    problems = _in_parallel(
        cases, lambda name: tmp_path / "empty" if name.startswith("empty") else tmp_path / "nowhere" / name, tmp_path)
    assert not problems, "\n\n".join(problems)


def test_output_into_a_closed_pipe_ends_quietly(demo_home, tmp_path):
    cases = [(f"closed pipe {' '.join(path)}", _argv(path, parser) + ["--json"]) for path, parser in LEAVES
             if any(a.dest == "json" for a in parser._actions)]
    cases += [("closed pipe status table", ["status"]), ("closed pipe help", ["--help"]),
              ("closed pipe version", ["--version"])]
    assert len(cases) >= 9
    # A command with nothing to show (exit 1) says so on standard error, which is still open.
    problems = _in_parallel(cases, lambda name: demo_home, tmp_path, closed_stdout=True, exits=CLOSED_PIPE_EXITS)
    assert not problems, "\n\n".join(problems)
    # The reader went away before anything was written: the command says so with 141, like `yes | head`.
    code, _, err = _run(["status", "--json"], demo_home, tmp_path, closed_stdout=True)
    assert (code, err) == (cli.BROKEN_PIPE_EXIT, "")
