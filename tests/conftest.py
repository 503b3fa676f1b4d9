"""Shared fixtures: the sample school, the installed command, and the shared corpus (when present)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "deploy" / "sample-school"
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
COMMAND = Path(sys.executable).parent / "choysez-auditd"

Run = Callable[..., subprocess.CompletedProcess[str]]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled module (mypyc, `make speedups`) that is older than its source: Python
    would import the stale compiled one and the edit would go untested."""
    stale = [
        so.relative_to(ROOT)
        for so in (ROOT / "auditd").rglob("*.so")
        if (src := so.with_name(so.name.split(".")[0] + ".py")).exists()
        and src.stat().st_mtime > so.stat().st_mtime
    ]
    if stale:
        pytest.exit(
            f"compiled modules older than their source: {', '.join(map(str, stale))}; run make speedups", 2
        )


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests' own cache folder (the classifier cache), never the developer's ~/.cache."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def pure_python_tree(dest: Path) -> Path:
    """A copy of the package (and policies) without its compiled modules: what runs without a C compiler."""
    shutil.copytree(ROOT / "auditd", dest / "auditd", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "policies", dest / "policies")
    return dest


def run_json(script: str, args: list[str], tree: Path) -> dict[str, object]:
    """What `script` prints as JSON, run by this Python with the package of `tree` (ROOT or a copy)."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        check=True,
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def corpus_path(*parts: str) -> Path:
    """A file of the shared corpus, or skip: a user's clone has no ../shared beside it."""
    path = CORPUS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared corpus not present ({path}); it exists only beside the project's own checkout")
    return path


@pytest.fixture
def school(tmp_path: Path) -> Path:
    """A private copy of the bundled sample school, so tests never touch the demo's store."""
    dest = tmp_path / "school"
    shutil.copytree(SAMPLE, dest, ignore=shutil.ignore_patterns("auditd.db*", "out"))
    return dest


@pytest.fixture
def cli() -> Run:
    """Run the installed `choysez-auditd` command as a user would."""
    assert COMMAND.exists(), f"{COMMAND} is not installed (run make test)"

    def run(
        *args: str | Path, check: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(COMMAND), *map(str, args)], capture_output=True, text=True, timeout=120, env=env, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """A throwaway PostgreSQL server for the whole session (skips when Debian's postgresql is absent)."""
    from tests.store.pgcluster import Cluster, pg_bin

    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not installed (Debian package postgresql; make test installs it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    cluster = Cluster(bindir)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: object) -> str:
    """A fresh, empty PostgreSQL database in the session's cluster."""
    from tests.store.pgcluster import Cluster

    assert isinstance(pg_cluster, Cluster)
    return pg_cluster.database()
