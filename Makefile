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

.PHONY: demo test lint typecheck unit sysdeps venv clean lock

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv"; $(SUDO) $(APT) update -qq && $(SUDO) $(APT) install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

sysdeps:
	@for pair in $(DEBIAN_TEST_TOOLS); do \
	  cmd=$${pair%%=*}; pkg=$${pair##*=}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) $(APT) install -y -qq $$missing; \
	fi

demo: $(STAMP)
	$(BIN)/choysez-auditd demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict auditd

unit: $(STAMP) sysdeps
	$(BIN)/pytest

test: lint typecheck unit

# Re-pin after changing dependencies in pyproject.toml: the versions a fresh machine will get.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache deploy/sample-school/auditd.db* deploy/sample-school/out
