"""The wheel works anywhere: built, installed into a fresh venv, run from another folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from estate import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("dbplan-*.whl")
    return built


def test_wheel_ships_the_schema(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "orchestrator/schemas/dbplan.schema.json" in names
    assert "orchestrator/cli.py" in names
    for stage in ("estate", "migrations", "server", "live", "planning", "execution", "render"):
        assert f"orchestrator/{stage}/__init__.py" in names
    assert not any(name.startswith("tests/") for name in names)


def test_installed_wheel_validates_and_plans_the_example_from_elsewhere(
    wheel: Path, tmp_path: Path, pg_url: str, dbname_prefix: str
) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    dbplan = env_dir / "bin" / "dbplan"

    example = tmp_path / "example"
    shutil.copy(REPO / "dbplan.yaml", example.with_suffix(".yaml"))
    example.mkdir()
    shutil.copy(REPO / "dbplan.yaml", example / "dbplan.yaml")
    shutil.copytree(REPO / "migrations", example / "migrations")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DATABASE_URL"] = pg_url

    validate = subprocess.run(
        [str(dbplan), "validate", "-f", str(example / "dbplan.yaml")], cwd=elsewhere, capture_output=True, text=True, env=env
    )
    assert validate.returncode == 0, validate.stderr
    assert "valid" in validate.stdout

    plan = subprocess.run(
        [str(dbplan), "plan", "--format", "json", "-f", str(example / "dbplan.yaml")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
    )
    assert plan.returncode in (0, 1), plan.stderr  # 1 only if the example's databases drifted on this server
    import json

    document = json.loads(plan.stdout)
    assert [s["service"] for s in document["services"]] == ["product", "inventory"]
    assert {a["file"] for a in document["actions"] if a["kind"] == "apply_migration"} <= {
        f"migrations/{service}/{path.name}"
        for service in ("product", "inventory")
        for path in (REPO / "migrations" / service).glob("*.up.sql")
    }
