# Two commands set up and run everything on a fresh machine:
#   make demo   - the main job on the embedded broker with real data
#   make test   - the test suite (CPU; Triton kernels under the interpreter)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser prometheus demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# One resolver call installs torch + torchvision as a matching pair (see pyproject.toml) with everything else.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Extra arguments of `inspection demo`, e.g. make demo DEMO_ARGS="--keep-running --rate 2"
DEMO_ARGS ?=
demo: install
	$(BIN)/inspection demo $(DEMO_ARGS)

# pytest exits 5 when it collected nothing: that is a failure here, as is any other non-zero code.
# Triton kernels run on the CPU under the interpreter, which must be switched on before triton is imported:
# they get their own pytest process.
# Debian's chromium for the browser tests of the HTML reports (Playwright drives it; it downloads no browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium is missing and this is not root: 'sudo apt-get install chromium' runs the browser tests"; \
	  fi; }

# Debian's prometheus (it brings promtool) for the monitoring tests: each test runs its own Prometheus process on
# 127.0.0.1 with a temporary config and storage. Only the binaries are wanted: the package's own system service,
# which Debian starts on install where systemd runs, is stopped and disabled right after installing it.
prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus >/dev/null; \
	    if [ -d /run/systemd/system ]; then systemctl disable --now prometheus.service >/dev/null 2>&1 || true; fi; \
	  else \
	    echo "prometheus is missing and this is not root: 'sudo apt-get install prometheus' runs the monitoring tests"; \
	  fi; }

# The kernel tests run even when the first call fails; the target fails if either did.
test: install browser prometheus
	@rc=0; \
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not interpret" --ignore=tests/kernels || rc=$$?; \
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m interpret tests/kernels || rc=$$?; \
	exit $$rc

test-fast: install browser prometheus
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not interpret"

lint: install
	$(BIN)/ruff check inspection fusion explain kernels services tests

clean:
	rm -rf $(VENV) runs .pytest_cache
