"""Start and stop `dagster dev` on a free loopback port, for the UI end-to-end test.

The server runs in a process group of its own (webserver, daemon, code servers and every run
worker it launches all join it), so stopping it signals the whole group and finally SIGKILLs
whatever is left: no Dagster process outlives the test, even when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_LOCATION = "labelloop"

WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""


class ServerDidNotStart(RuntimeError):
    """`dagster dev` exited or did not answer in time; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dagster_env(home: Path, tmpdir: Path | None = None) -> dict[str, str]:
    """The environment the Make targets give `dagster dev`, pointed at `home`."""
    env = dict(os.environ)
    env.update(
        LABELLOOP_HOME=str(home),
        DAGSTER_HOME=str(REPO_ROOT),
        LABELLOOP_DAGSTER_STORAGE=str(home / "dagster"),
        PYTHONUNBUFFERED="1",
    )
    # dagster dev keeps its workspace file and gRPC sockets in TMPDIR; a killed server leaves
    # them behind, so keep them in the test's own temporary folder (when its path is short
    # enough for a Unix socket name: 108 bytes in all).
    if tmpdir is not None and len(str(tmpdir)) <= 60:
        tmpdir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    return env


def _get(url: str, data: bytes | None = None, timeout: float = 5.0) -> bytes:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


@dataclass
class DagsterDev:
    """A running `dagster dev`; use `start()` / `stop()` or the `running()` context manager."""

    home: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    tmpdir: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # dagster colours its log lines
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 90.0) -> DagsterDev:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "dagster"), "dev",
            "-w", str(REPO_ROOT / "workspace.yaml"),
            "-p", str(self.port), "-h", self.host,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=dagster_env(self.home, self.tmpdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals all of it
            )
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, timeout: float) -> None:
        """Until /server_info answers and the code location has loaded (or failed to)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerDidNotStart(
                    f"`dagster dev` exited with code {self.process.returncode} before answering "
                    f"on {self.url}; log tail:\n{self.log_tail()}"
                )
            try:
                _get(self.url + "/server_info")
                answer = json.loads(_get(self.url + "/graphql",
                                         json.dumps({"query": WORKSPACE_QUERY}).encode()))
                entries = answer["data"]["workspaceOrError"]["locationEntries"]
                entry = next((e for e in entries if e["name"] == CODE_LOCATION), None)
                if entry is None:
                    last = f"code location {CODE_LOCATION!r} not in the workspace: {entries}"
                elif entry["loadStatus"] == "LOADED":
                    location = entry["locationOrLoadError"] or {}
                    if location.get("__typename") == "PythonError":
                        raise ServerDidNotStart(
                            f"code location {CODE_LOCATION!r} failed to load: "
                            f"{location['message']}\nlog tail:\n{self.log_tail()}"
                        )
                    return
                else:
                    last = f"code location {CODE_LOCATION!r} is {entry['loadStatus']}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, KeyError,
                    TypeError, ValueError) as error:
                last = f"{type(error).__name__}: {error}"
            time.sleep(0.5)
        raise ServerDidNotStart(
            f"`dagster dev` did not come up on {self.url} within {timeout:.0f}s ({last}); "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """Ctrl-C the whole group (what `dagster dev` expects), then SIGKILL what is left."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGINT)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Children (webserver, daemon, code servers, run workers) may outlive the leader.
        _signal_group(pgid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process = None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in the process group `pgid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members
