# choysez-auditd: `make demo` and `make test` work on a fresh Debian machine with Python 3.11.
# They create .venv, install the pinned dependencies (constraints.txt), and install any Debian
# package the tests need when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
APT    := $(shell command -v apt-get)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the test suite uses (command to look for = package that provides it).
DEBIAN_TEST_TOOLS := dovecot=dovecot-imapd chromium=chromium tcpdump=tcpdump systemd-analyze=systemd setpriv=util-linux pg_ctlcluster=postgresql

# Compiled to C with mypyc (part of mypy) when a C compiler and Python's headers are present: the
# capture reader's per-packet loop then runs about twice as fast, and so does the Zeek and Squid
# readers' per-line scan (logscan). The .py file stays the source and
# the fallback; an edit to it rebuilds the compiled module on the next `make demo` or `make test`
# (and the test suite refuses to run against a compiled module older than its source).
SPEEDUPS      := auditd/sources/pcap.py auditd/sources/logscan.py
SPEEDUP_STAMP := $(VENV)/.speedups-stamp
HAVE_CC       := $(BIN)/python -c 'import os, shutil, sys, sysconfig; \
  sys.exit(not (shutil.which("cc") and os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")))'

.PHONY: demo test lint typecheck unit sysdeps venv speedups clean lock

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv"; $(SUDO) $(APT) update -qq && $(SUDO) $(APT) install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

speedups: $(SPEEDUP_STAMP)

$(SPEEDUP_STAMP): $(STAMP) $(SPEEDUPS)
	@rm -f $(foreach m,$(SPEEDUPS),$(basename $(m)).*.so $(basename $(m))__mypyc.*.so)
	@rm -rf build/mypyc
	@if $(HAVE_CC) 2>/dev/null; then \
	  for m in $(SPEEDUPS); do \
	    echo "compiling $$m with mypyc"; \
	    mkdir -p build/mypyc/$$(dirname $$m); \
	    (cd build/mypyc && ../../$(BIN)/mypyc $(CURDIR)/$$m >mypyc.log 2>&1) || \
	      { tail -20 build/mypyc/mypyc.log; echo "mypyc failed on $$m (log: build/mypyc/mypyc.log)"; exit 1; }; \
	  done; \
	  (cd build/mypyc && find auditd -name '*.so' -exec cp --parents {} $(CURDIR) \;); \
	else \
	  echo "note: no C compiler or Python headers (apt-get install gcc python3-dev):" \
	       "$(SPEEDUPS) run as pure Python, about half as fast"; \
	fi
	@touch $@

sysdeps:
	@for pair in $(DEBIAN_TEST_TOOLS); do \
	  cmd=$${pair%%=*}; pkg=$${pair##*=}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) $(APT) install -y -qq $$missing; \
	fi

demo: $(STAMP) $(SPEEDUP_STAMP)
	$(BIN)/choysez-auditd demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict auditd

unit: $(STAMP) $(SPEEDUP_STAMP) sysdeps
	$(BIN)/pytest

test: lint typecheck unit

# Re-pin after changing dependencies in pyproject.toml: the versions a fresh machine will get.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf build $(foreach m,$(SPEEDUPS),$(basename $(m)).*.so $(basename $(m))__mypyc.*.so)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache deploy/sample-school/auditd.db* deploy/sample-school/out
