"""tests/mutants.py: the sites it mutates, and a sweep on a two-function package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.mutants import mutants, mutate

pytestmark = pytest.mark.unit

SOURCE = textwrap.dedent('''\
    def f(x, n: int = 3):
        """Docstrings, annotations and module constants are left alone."""
        return x + 1 if x < 0 else -x

    Y = 5
''')


def test_every_site_inside_a_function_and_what_it_becomes():
    returns = {m.change: next(line.strip() for line in mutate(SOURCE, m).splitlines() if "return" in line)
               for m in mutants(SOURCE) if m.line == 3}
    assert returns == {"Lt -> LtE": "return x + 1 if x <= 0 else -x",
                       "Add -> Sub": "return x - 1 if x < 0 else -x",
                       "drop USub": "return x + 1 if x < 0 else x",
                       "0 -> 1": "return x + 1 if x < 1 else -x",
                       "1 -> 2": "return x + 2 if x < 0 else -x"}
    assert [(m.line, m.change) for m in mutants(SOURCE) if m.line != 3] == [(1, "3 -> 4")]  # the default
    assert {m.function for m in mutants(SOURCE)} == {"f"} and not mutants(SOURCE, only={"g"})


def test_a_sweep_names_the_behaviour_no_test_pins_and_leaves_the_tree_alone(tmp_path):
    (tmp_path / "mod.py").write_text("def add(a, b):\n    return a + b\n\n\ndef positive(x):\n    return x > 0\n")
    (tmp_path / "test_mod.py").write_text("from mod import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    before = (tmp_path / "mod.py").read_text()
    out = subprocess.run([sys.executable, "-m", "tests.mutants", "mod.py", "--", "test_mod.py"], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
                         check=True).stdout
    assert '"function": "add", "change": "Add -> Sub", "verdict": "killed"' in out
    assert '"function": "positive", "change": "Gt -> GtE", "verdict": "SURVIVED"' in out
    assert out.rstrip().endswith("2 of 3 survived")  # positive's > and its 0 are untested
    assert (tmp_path / "mod.py").read_text() == before
