"""Loading the code location, and the CLI's commands that need no model, must not import the
heavy libraries (scikit-learn, scipy, matplotlib, pandera, pandas; at load, NumPy too): they are
imported where used.

Each case runs in a fresh interpreter, since this test process has long since imported them.
The behaviour is asserted, not the time it takes: the machine running the tests may be busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labelloop_assets.core import store
from labelloop_assets.core.settings import Home

ROOT = Path(__file__).resolve().parents[1]
LAZY = ("sklearn", "scipy", "matplotlib", "pandera", "pandas")
# Loading the code location reads no data, so it needs no NumPy either (a tenth of its time); a
# command that reads the store does: DuckDB hands frames over through pyarrow, which imports it.
LAZY_AT_LOAD = (*LAZY, "numpy")

CODE_LOCATION = "import labelloop_assets.definitions\n"
CLI = """
import contextlib, io
from labelloop_assets import cli

with contextlib.redirect_stdout(io.StringIO()):
    try:
        cli.main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0, exit_.code
    assert cli.main(["status", "--json"]) == 0
"""
REPORT = """
import json, sys
import labelloop_assets
print(json.dumps([labelloop_assets.__file__, sorted({name.split(".")[0] for name in sys.modules})]))
"""


@pytest.mark.parametrize(("code", "lazy"), [(CODE_LOCATION, LAZY_AT_LOAD), (CLI, LAZY)], ids=["definitions", "cli"])
def test_heavy_libraries_are_not_imported(code, lazy, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LABELLOOP_CATALOG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    home = Home(tmp_path / "home")
    home.root.mkdir()
    # An empty store for `status` to read, made here: creating one binds parameters, for which
    # DuckDB imports pandas.
    store.connect(home.database_file).close()
    env["LABELLOOP_HOME"] = str(home.root)
    done = subprocess.run([sys.executable, "-c", code + REPORT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    package, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(package).is_relative_to(ROOT), package  # this checkout, not another install
    assert not set(imported) & set(lazy), sorted(set(imported) & set(lazy))
