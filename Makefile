# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean bench

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "xmodal needs $(PYTHON) (torch 2.14.1 wheels are for CPython 3.11 here); set PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -c requirements.lock -e '.[test,wandb]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xmodal demo --out demo_run

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_speed.py

# The search page of `xmodal serve` in a real browser: Debian's chromium (apt, when missing) driven by the
# pinned playwright package (never a browser download). The test fails, rather than skips, without chromium.
.PHONY: e2e
e2e: $(STAMP)
	@test -x /usr/bin/chromium || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(PY) -m pip install -q -c requirements.lock playwright
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 XMODAL_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/e2e

clean:
	rm -rf $(VENV) demo_run
