# The two entry points of README.md. Each installs what it needs into its own virtual environment.
PYTHON ?= python3
SERVE_VENV := .venv-serve
TEST_VENV := .venv

.PHONY: serve keygen test lint format install-serve install-test install-browser install-containers

# Serving install: no torch (the server never imports it). A regular (non-editable) install, so it
# is redone when pyproject.toml or a packaged source file changes, and skipped otherwise: the stamp
# file is newer than all of them.
SERVE_STAMP := $(SERVE_VENV)/.installed
SERVE_SOURCES := pyproject.toml constraints.txt README.md $(shell find service trainer -type f \
	\( -name '*.py' -o -name '*.pyi' -o -name '*.lua' -o -name '*.yaml' -o -name '*.html' -o -name '*.js' -o -name '*.css' -o -name '*.ico' -o -name '*.svg' \) -not -path '*/__pycache__/*')

$(SERVE_STAMP): $(SERVE_SOURCES)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q -c constraints.txt .
	touch $@

install-serve: $(SERVE_STAMP)

# ARGS: flags for the command, e.g. make serve ARGS="--port 9000 --api-keys keys.toml"
# (`fewshot serve --help` lists them all; each also has a FEWSHOT_* environment variable).
ARGS ?=

serve: install-serve
	$(SERVE_VENV)/bin/fewshot serve $(ARGS)

# make keygen ARGS="--name bot --role read --namespace team-a" >> keys.toml: only the TOML entry
# reaches stdout (the install's output and the key itself go to stderr).
keygen:
	@$(MAKE) --no-print-directory install-serve >&2
	@$(SERVE_VENV)/bin/fewshot keygen $(ARGS)

# Test install: torch/torchvision pinned to a pair that imports together (timm needs torchvision).
install-test:
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(TEST_VENV)/bin/pip install -q -c constraints.txt -e '.[train,test]'

# The /ui/ playground test drives Debian's Chromium through its chromedriver (no browser download:
# Playwright's and Selenium Manager's are not reachable). Installed with apt-get when missing (root,
# as on CI); elsewhere install them yourself: `apt-get install chromium chromium-driver`.
install-browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "chromium and chromedriver missing: tests/test_playground.py will fail" >&2; fi

# tests/test_container_images.py builds the Dockerfile's images and runs them with podman: no
# Docker engine on CI machines, and podman needs no daemon. Its base images are made from Debian
# packages (mmdebstrap) where no registry is reachable. Installed with apt-get when missing (root);
# elsewhere those tests skip, saying what to install.
install-containers:
	@if command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null && command -v tini-static >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc tini mmdebstrap uidmap; \
	else echo "podman, runc, tini or mmdebstrap missing: tests/test_container_images.py will skip" >&2; fi

test: install-test install-browser install-containers
	$(TEST_VENV)/bin/python -m pytest

# The formatter and linter CI runs (configured in pyproject.toml); `make format` applies both.
lint: install-test
	$(TEST_VENV)/bin/ruff format --check .
	$(TEST_VENV)/bin/ruff check .

format: install-test
	$(TEST_VENV)/bin/ruff format .
	$(TEST_VENV)/bin/ruff check --fix .
