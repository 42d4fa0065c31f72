# Two commands set up and run everything on a fresh machine:
#   make demo   - the main job on the embedded broker with real data
#   make test   - the test suite (CPU; Triton kernels under the interpreter)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# One resolver call installs torch + torchvision as a matching pair (see pyproject.toml) with everything else.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/inspection demo

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

# The kernel tests run even when the first call fails; the target fails if either did.
test: install browser
	@rc=0; \
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not interpret" --ignore=tests/kernels || rc=$$?; \
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m interpret tests/kernels || rc=$$?; \
	exit $$rc

test-fast: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not interpret"

lint: install
	$(BIN)/ruff check inspection fusion explain kernels services tests

clean:
	rm -rf $(VENV) runs .pytest_cache
