"""The built wheel ships the SQL, and `pgqueue` installed from it can migrate."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .helpers import ROOT, cli, env_for

pytestmark = pytest.mark.slow


def run(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (pip install build)")
    out = tmp_path_factory.mktemp("dist")
    # Without isolation when the backend is already here: no download needed.
    offline = ["--no-isolation"] if importlib.util.find_spec("hatchling") else []
    run(sys.executable, "-m", "build", "--wheel", *offline, "--outdir", out, ROOT)
    [built] = out.glob("pgqueue-*.whl")
    return built


def test_wheel_contains_every_migration(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = sorted((ROOT / "sql" / "migrations").glob("*.sql"))
    assert migrations
    for path in migrations:
        assert f"pgqueue/sql/migrations/{path.name}" in names


def test_pgqueue_installed_from_the_wheel_migrates(
    wheel: Path, tmp_path: Path, dsn: str
) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        wheel,
    )
    # Dependencies (psycopg, typer, ...) come from this venv's site-packages,
    # added as a plain path: its .pth files (the editable install pointing at
    # this checkout) are not processed, so only the wheel provides pgqueue.
    site = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    )
    deps = sysconfig.get_paths()["purelib"]
    (Path(site.stdout.strip()) / "_test_deps.pth").write_text(deps + "\n")

    env = env_for(dsn)
    where = run(
        python, "-c", "import pgqueue; print(pgqueue.__file__)", cwd=tmp_path, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(venv)

    pgqueue = venv / "bin" / "pgqueue"
    printed = run(pgqueue, "migrate", "--print", cwd=tmp_path, env=env).stdout
    assert printed == cli(dsn, "migrate", "--print").stdout  # same as the checkout
    assert 'create function "pgqueue".lease' in printed

    applied = run(
        pgqueue, "--schema", "from_wheel", "migrate", cwd=tmp_path, env=env
    ).stdout
    count = len(list((ROOT / "sql" / "migrations").glob("*.sql")))
    assert len(applied.splitlines()) == count
    assert applied.startswith("applied 0001_initial")
