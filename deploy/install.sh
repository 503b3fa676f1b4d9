#!/bin/sh
# Install or upgrade choysez-auditd from this checkout. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh                      # the real system: /opt, /etc, systemd units, user
#   deploy/install.sh --destdir /tmp/root       # stage into a folder; no root, touches nothing else
#
# What it does (paths below are under DESTDIR when given):
#   - a virtualenv at PREFIX/venv with choysez-auditd and its pinned dependencies (constraints.txt),
#     its capture reader and log scanners compiled with mypyc when this machine has a C compiler and
#     Python's headers (else they run as plain Python, a third as fast; --no-compile skips it);
#   - SYSCONFDIR/config.toml, staff.csv, community.csv from the examples, only when absent: an
#     edited file is never overwritten; when the shipped example changed, it is written beside it
#     as FILE.dist for you to compare;
#   - the units choysez-auditd.service and choysez-auditd-capture.service in UNITDIR (replaced:
#     local changes belong in drop-ins, `systemctl edit choysez-auditd`);
#   - /etc/credstore (0700) for the secrets, and the docs in PREFIX/share;
#   - on the real system only: the system user choysez-auditd, the config folder readable by its
#     group alone, then (on upgrade) stop, migrate the store as that user (it keeps a .vN.bak copy),
#     daemon-reload and start again what was running. A first install enables the unit but does
#     not start it: the config needs editing first.
# With DESTDIR it never calls useradd, chown or systemctl, so it needs no root (CI runs it this way).
set -eu

PREFIX=/opt/choysez-auditd
SYSCONFDIR=/etc/choysez-auditd
UNITDIR=/etc/systemd/system
CREDSTORE=/etc/credstore
STATEDIR=/var/lib/choysez-auditd
SERVICE_USER=choysez-auditd
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-}
NO_DEPS=0
PIP_EXTRA=""
START=1
COMPILE=1
SPEEDUPS="sources/pcap.py sources/logscan.py"  # as in the Makefile's SPEEDUPS

SRC=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<EOF
usage: $0 [--prefix DIR] [--sysconfdir DIR] [--unitdir DIR] [--destdir DIR] [--python PY]
          [--no-deps] [--find-links DIR] [--no-start] [--no-compile]

  --prefix DIR      program folder (default $PREFIX); the venv is DIR/venv
  --sysconfdir DIR  config folder (default $SYSCONFDIR)
  --unitdir DIR     systemd units (default $UNITDIR)
  --destdir DIR     stage everything under DIR (also \$DESTDIR): no root, no user, no systemctl
  --python PY       interpreter for the venv (default: python3.11, else python3; 3.11 or later)
  --no-deps         install choysez-auditd alone, without its dependencies and uncompiled (layout checks in CI)
  --find-links DIR  install from the wheels in DIR only (no index), e.g. an offline wheelhouse
  --no-start        do not enable or (re)start the service
  --no-compile      do not compile the capture reader and log scanners (mypyc): plain Python
EOF
}

die() { echo "install.sh: $*" >&2; exit 2; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) PREFIX=${2:?}; shift 2 ;;
        --sysconfdir) SYSCONFDIR=${2:?}; shift 2 ;;
        --unitdir) UNITDIR=${2:?}; shift 2 ;;
        --destdir) DESTDIR=${2:?}; shift 2 ;;
        --python) PYTHON=${2:?}; shift 2 ;;
        --no-deps) NO_DEPS=1; shift ;;
        --find-links) PIP_EXTRA="--no-index --find-links ${2:?}"; shift 2 ;;
        --no-start) START=0; shift ;;
        --no-compile) COMPILE=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case $PREFIX in /*) ;; *) die "--prefix must be an absolute path: $PREFIX" ;; esac
case $SYSCONFDIR in /*) ;; *) die "--sysconfdir must be an absolute path: $SYSCONFDIR" ;; esac
case $UNITDIR in /*) ;; *) die "--unitdir must be an absolute path: $UNITDIR" ;; esac
if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
    [ "$DESTDIR" != / ] || DESTDIR=""
fi
REAL=0
[ -n "$DESTDIR" ] || REAL=1
if [ $REAL = 1 ] && [ "$(id -u)" != 0 ]; then
    die "installing into the system needs root (or stage with --destdir DIR)"
fi

if [ -z "$PYTHON" ]; then
    PYTHON=$(command -v python3.11 || command -v python3 || true)
fi
[ -n "$PYTHON" ] || die "no python3 found (Debian: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than Python 3.11"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PYTHON cannot make a venv (Debian: apt-get install python3-venv)"

VENV=$DESTDIR$PREFIX/venv
ETC=$DESTDIR$SYSCONFDIR
UNITS=$DESTDIR$UNITDIR
CREDS=$DESTDIR$CREDSTORE
SHARE=$DESTDIR$PREFIX/share

# ---- the program ---------------------------------------------------------------------------
UPGRADE=0
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    UPGRADE=1
    say "upgrading the venv in $PREFIX/venv"
else
    say "creating the venv in $PREFIX/venv"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PIP_ARGS="--disable-pip-version-check --quiet --upgrade --upgrade-strategy only-if-needed"
if [ $NO_DEPS = 1 ]; then
    PIP_ARGS="$PIP_ARGS --no-deps"
fi
# shellcheck disable=SC2086  # word splitting of the option lists is intended
"$VENV/bin/python" -m pip install $PIP_ARGS $PIP_EXTRA -c "$SRC/constraints.txt" "$SRC"
SITE=$("$VENV/bin/python" -I -c 'import auditd, os; print(os.path.dirname(auditd.__file__))')  # -I: not the cwd's
remove_compiled() {
    for m in $SPEEDUPS; do rm -f "$SITE/${m%.py}".*.so "$SITE/${m%.py}"__mypyc.*.so; done
}
# A compiled module left by an earlier install would shadow the new source: always remove, then build.
remove_compiled
if [ $COMPILE = 1 ] && [ $NO_DEPS = 0 ]; then
    if command -v cc >/dev/null && "$VENV/bin/python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        BUILD=$(mktemp -d)
        # mypy (with mypyc) in a venv of its own: the program's venv stays as the lock file says.
        # shellcheck disable=SC2086
        if "$PYTHON" -m venv "$BUILD/venv" \
            && "$BUILD/venv/bin/python" -m pip install --disable-pip-version-check --quiet $PIP_EXTRA \
                -c "$SRC/constraints.txt" mypy setuptools >"$BUILD/log" 2>&1; then
            ok=1
            mkdir -p "$BUILD/work"
            cp -R "$SITE" "$BUILD/work/auditd"  # compiled from a copy: site-packages is no source root
            for m in $SPEEDUPS; do
                if (cd "$BUILD/work" && "$BUILD/venv/bin/mypyc" --python-executable "$VENV/bin/python" \
                        "auditd/$m") >>"$BUILD/log" 2>&1; then
                    cp "$BUILD/work/build/lib."*/auditd/"$(dirname "$m")"/"$(basename "${m%.py}")"*.so \
                        "$SITE/$(dirname "$m")/"
                else
                    ok=0
                fi
            done
            if [ $ok = 1 ]; then
                say "compiled with mypyc: $SPEEDUPS"
            else
                remove_compiled
                tail -5 "$BUILD/log" >&2
                say "note: mypyc could not compile $SPEEDUPS: they run as plain Python"
            fi
        else
            say "note: mypy could not be installed to compile $SPEEDUPS: they run as plain Python"
        fi
        rm -rf "$BUILD"
    else
        say "note: no C compiler or Python headers (apt-get install gcc python3-dev): $SPEEDUPS run as plain Python"
    fi
fi
if [ -n "$DESTDIR" ]; then
    # The venv's scripts name their interpreter by path: make them name the final one.
    for f in "$VENV"/bin/*; do
        if [ -f "$f" ] && [ ! -L "$f" ] && grep -Iq . "$f" 2>/dev/null; then
            sed -i "s#$DESTDIR$PREFIX/venv#$PREFIX/venv#g" "$f"
        fi
    done
fi

mkdir -p "$SHARE"
for doc in README.md worker-notice.md dpia-outline.md config.example.toml staff.csv community.csv; do
    if [ -f "$SRC/deploy/$doc" ]; then install -m 0644 "$SRC/deploy/$doc" "$SHARE/$doc"; fi
done

# ---- configuration: never overwrite what the admin edited --------------------------------------
mkdir -p "$ETC"
chmod 0750 "$ETC"
umask 027
example_config() {
    # The example, with the store in the state folder (the config folder is read-only to the daemon).
    sed "s#^path = \"auditd.db\"#path = \"$STATEDIR/auditd.db\"#" "$SRC/deploy/config.example.toml"
}
install_config_file() {  # NAME, then the content on stdin
    name=$1
    tmp=$(mktemp "$ETC/.$name.XXXXXX")
    cat > "$tmp"
    chmod 0640 "$tmp"
    if [ ! -e "$ETC/$name" ]; then
        mv "$tmp" "$ETC/$name"
        say "installed $SYSCONFDIR/$name"
    elif cmp -s "$tmp" "$ETC/$name"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$ETC/$name.dist"
        say "kept your $SYSCONFDIR/$name; the shipped version is $SYSCONFDIR/$name.dist"
    fi
}
example_config | install_config_file config.toml
install_config_file staff.csv < "$SRC/deploy/staff.csv"
install_config_file community.csv < "$SRC/deploy/community.csv"
umask 022
mkdir -p "$CREDS"
chmod 0700 "$CREDS"

# ---- systemd units: ours to replace; local changes go in drop-ins -------------------------------
mkdir -p "$UNITS"
for unit in choysez-auditd.service choysez-auditd-capture.service; do
    sed -e "s#/opt/choysez-auditd/#$PREFIX/#g" -e "s#/etc/choysez-auditd/#$SYSCONFDIR/#g" \
        "$SRC/systemd/$unit" > "$UNITS/$unit.tmp"
    chmod 0644 "$UNITS/$unit.tmp"
    mv "$UNITS/$unit.tmp" "$UNITS/$unit"
done
say "installed the units in $UNITDIR"

# ---- check what was installed ---------------------------------------------------------------
if [ $NO_DEPS = 0 ]; then
    "$VENV/bin/python" -m auditd check --offline --config "$ETC/config.toml" >/dev/null \
        || die "the installed config does not pass 'choysez-auditd check --offline' (see above)"
    say "choysez-auditd check --offline: ok"
fi

if [ $REAL = 0 ]; then
    say "staged under $DESTDIR (no user created, systemd not touched)"
    exit 0
fi

# ---- the real system ------------------------------------------------------------------------
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir "$STATEDIR" \
        --shell /usr/sbin/nologin --comment "choysez-auditd policy audit" "$SERVICE_USER"
    say "created the system user $SERVICE_USER"
fi
chgrp "$SERVICE_USER" "$ETC" "$ETC/config.toml" "$ETC/staff.csv" "$ETC/community.csv"

have_systemd=0
[ -d /run/systemd/system ] && have_systemd=1
was_active=0
if [ $have_systemd = 1 ] && systemctl is-active --quiet choysez-auditd.service; then
    was_active=1
    systemctl stop choysez-auditd.service
fi
STORE=$("$VENV/bin/python" -c 'import sys; from auditd.config import load_config
print(load_config(sys.argv[1]).store.path)' "$ETC/config.toml")
if [ $UPGRADE = 1 ] && [ -e "$STORE" ]; then
    # As the service user, so the -wal and -shm files stay its own; keeps a .vN.bak copy.
    runuser -u "$SERVICE_USER" -- "$VENV/bin/choysez-auditd" store migrate --config "$ETC/config.toml"
fi
if [ $have_systemd = 1 ]; then
    systemctl daemon-reload
    if [ $START = 1 ]; then
        systemctl enable choysez-auditd.service
        # A first install waits for the admin to write the config; an upgrade starts what ran.
        if [ $was_active = 1 ]; then
            systemctl start choysez-auditd.service
        fi
    fi
else
    say "systemd is not running here: start the daemon with systemctl once it is"
fi
say "done. Next: edit $SYSCONFDIR/config.toml, put secrets in $CREDSTORE (see $PREFIX/share/README.md)"
