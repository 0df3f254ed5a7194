"""The Makefile's data rule, run by make itself on a copy of the Makefile with a stand-in Python that
logs what it is asked to run: a stage builds the default world when there is none, and never
rewrites data that exists (another world.seed, or made outside make) behind the user's back."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stage

FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/../../calls.log"
if [ "$1 $2" = "-m stages.datagen" ]; then
  mkdir -p "${RLHF_ROOT:-.}/data/world" && echo "$*" > "${RLHF_ROOT:-.}/data/world/sft_train.jsonl"
fi
"""


@pytest.fixture
def project(tmp_path) -> Path:
    for name in ("Makefile", "pyproject.toml", "constraints.txt", "conf/world/default.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "pipeline/world").mkdir(parents=True)
    (tmp_path / "pipeline/world/generator.py").write_text("")
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    time.sleep(0.01)
    (tmp_path / ".venv/.installed-stamp").touch()  # newer than pyproject.toml: nothing to install
    return tmp_path


def make(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RLHF_ROOT"} | (env or {})
    return subprocess.run(["make", "-s", *args], cwd=project, capture_output=True, text=True, env=env, timeout=60)


def calls(project: Path) -> list[str]:
    log = project / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_stage_builds_the_default_world_once(project):
    assert make(project, "sft").returncode == 0
    assert calls(project) == ["-m stages.datagen", "-m stages.sft"]
    assert make(project, "rm", "ARGS=lora.r=4").returncode == 0
    assert calls(project)[2:] == ["-m stages.rm lora.r=4"]


def test_data_of_another_world_is_never_rebuilt_behind_the_users_back(project):
    assert make(project, "data", "ARGS=world.seed=3").returncode == 0
    data = project / "data/world/sft_train.jsonl"
    assert data.read_text() == "-m stages.datagen world.seed=3\n"
    time.sleep(0.01)
    (project / "pipeline/world/generator.py").write_text("# the world's code changed\n")
    done = make(project, "sft")
    assert done.returncode != 0 and "stages.sft" not in " ".join(calls(project))
    assert "rebuild it with make data, adding the ARGS it was made with" in done.stderr
    assert data.read_text() == "-m stages.datagen world.seed=3\n"  # untouched
    (project / "data/world/.stamp").touch()  # the user keeps it
    assert make(project, "sft").returncode == 0 and calls(project)[-1] == "-m stages.sft"


def test_data_made_outside_make_under_rlhf_root_is_kept(project, tmp_path_factory):
    root = tmp_path_factory.mktemp("elsewhere")
    (root / "data/world").mkdir(parents=True)
    (root / "data/world/sft_train.jsonl").write_text("world.seed=5\n")
    done = make(project, "sft", env={"RLHF_ROOT": str(root)})
    assert done.returncode != 0 and f"{root}/data/world is older" in done.stderr
    assert (root / "data/world/sft_train.jsonl").read_text() == "world.seed=5\n"
    assert not (project / "data").exists()  # nothing written into the checkout either
    empty = tmp_path_factory.mktemp("fresh")
    assert make(project, "sft", env={"RLHF_ROOT": str(empty)}).returncode == 0
    assert (empty / "data/world/.stamp").exists() and calls(project)[-2:] == ["-m stages.datagen", "-m stages.sft"]
