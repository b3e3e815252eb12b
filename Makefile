# xentools: every target sets itself up on a fresh Debian 12 machine.
# Python packages go into .venv; Debian packages are installed with apt-get when root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt-installed

# Debian packages the host-side tests need: the authoritative headers (struct layout checks),
# a 32-bit compiler for the x86_32 ABI probe, and Xen's C xenstore tools as a test peer.
HOST_DEBS := libxen-dev gcc-multilib xenstore-utils

.PHONY: all venv debs test test-host demo bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

# Installs Debian packages when running as root; otherwise says what is missing.
$(APT_STAMP): | $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
	    missing=$$(for p in $(HOST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	    if [ -n "$$missing" ]; then \
	        echo "make: installing Debian packages: $$missing"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	    fi; \
	else \
	    for p in $(HOST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || { echo "make: Debian package $$p is missing; run as root or: apt-get install $$p"; exit 1; }; done; \
	fi
	touch $@

debs: $(APT_STAMP)

# pytest's exit code 5 (no tests collected) is a failure, not silence.
test-host: $(STAMP) $(APT_STAMP)
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test: test-host

demo: $(STAMP)
	$(VENV)/bin/xentools demo

bench: $(STAMP)
	$(VENV)/bin/xentools bench --json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
