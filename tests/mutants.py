"""Would the tests fail if the code broke? Mutate one site at a time and run them.

    .venv/bin/python -m tests.mutants pipeline/rl/estimators.py -- tests/unit/rl
    .venv/bin/python -m tests.mutants pipeline/core/identity.py --only config_hash -- tests/unit/core

Each mutant changes one operator, comparison, sign, number or boolean inside a function
(``+`` to ``-``, ``<`` to ``<=``, ``-x`` to ``x``, ``0`` to ``1``, ...), writes the module into a
copy of the repository's tracked files, and runs pytest there on the given tests; your working
tree is never touched. A mutant the tests pass is a *survivor*: a behaviour no test pins down,
unless the change is equivalent (``dim=-1`` to ``dim=1`` on a 2-D tensor, a tolerance doubled).
Read each survivor and decide. Slow by design: one pytest run per mutant, so point it at the
fastest tests that should catch the file's mistakes.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
         ast.FloorDiv: ast.Div, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And, ast.Is: ast.IsNot,
         ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


@dataclass(frozen=True)
class Mutant:
    index: int  # the site's position in ast.walk order, so the same site is found in a fresh parse
    line: int
    function: str
    change: str


def _functions(tree: ast.AST) -> dict[int, str]:
    """id(node) -> name of the innermost function holding it."""
    owner: dict[int, str] = {}

    def visit(node: ast.AST, name: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
        if name is not None:
            owner[id(node)] = name
        for child in ast.iter_child_nodes(node):
            visit(child, name)
    visit(tree, None)
    return owner


def _annotations(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        parts = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = [a.annotation for a in node.args.args + node.args.kwonlyargs] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            parts = [node.annotation]
        skip |= {id(n) for part in parts if part is not None for n in ast.walk(part)}
    return skip


def _change(node: ast.AST) -> str | None:
    """What mutating ``node`` does, or None when it is no mutation site."""
    if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
        return f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"
    if isinstance(node, ast.Compare) and type(node.ops[0]) in SWAPS:
        return f"{type(node.ops[0]).__name__} -> {SWAPS[type(node.ops[0])].__name__}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        return f"drop {type(node.op).__name__}"
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return f"{node.value} -> {not node.value}"
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return f"{node.value!r} -> {_bumped(node.value)!r}"
    return None


def _bumped(v: int | float) -> int | float:
    return v + 1 if isinstance(v, int) else (v * 2 if v else 1.0)


def mutants(source: str, only: set[str] | None = None) -> list[Mutant]:
    """Every mutation site inside a function of ``source`` (annotations and docstrings aside)."""
    tree = ast.parse(source)
    owner, skip = _functions(tree), _annotations(tree)
    out = []
    for i, node in enumerate(ast.walk(tree)):
        change = _change(node)
        name = owner.get(id(node))
        if change and name and id(node) not in skip and (only is None or name in only):
            out.append(Mutant(i, node.lineno, name, change))
    return out


def mutate(source: str, mutant: Mutant) -> str:
    """``source`` with ``mutant`` applied, as ``ast.unparse`` writes it."""
    tree = ast.parse(source)
    node = list(ast.walk(tree))[mutant.index]
    if isinstance(node, ast.UnaryOp):
        for parent in ast.walk(tree):
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, node.operand)
                elif isinstance(value, list) and any(v is node for v in value):
                    value[[v is node for v in value].index(True)] = node.operand
    elif isinstance(node, (ast.BinOp, ast.BoolOp)):
        node.op = SWAPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[0] = SWAPS[type(node.ops[0])]()
    elif isinstance(node.value, bool):
        node.value = not node.value
    else:
        node.value = _bumped(node.value)
    return ast.unparse(ast.fix_missing_locations(tree))


def _copy_repository(repo: Path, into: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src, dst = repo / name, into / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _passes(copy: Path, tests: list[str], timeout: float) -> bool | None:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        return subprocess.run(cmd, cwd=copy, capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the module to mutate, relative to the repository root")
    parser.add_argument("--only", help="comma-separated function names")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args(argv[:split])
    tests = argv[split + 1:] or ["tests/unit"]
    repo = Path.cwd()
    source = (repo / args.source).read_text()
    todo = sorted(mutants(source, set(args.only.split(",")) if args.only else None), key=lambda m: (m.line, m.index))
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy = Path(tmp)
        _copy_repository(repo, copy)
        target = copy / args.source
        target.write_text(ast.unparse(ast.parse(source)))  # the mutants' formatting, unmutated
        if not _passes(copy, tests, args.timeout):
            print(f"the tests fail on the unmutated {args.source}: fix them first", file=sys.stderr)
            return 2
        print(f"{len(todo)} mutants of {args.source}, tests: {' '.join(tests)}", flush=True)
        survivors = 0
        for m in todo:
            target.write_text(mutate(source, m))
            start = time.time()
            passed = _passes(copy, tests, args.timeout)
            survivors += bool(passed)
            verdict = {True: "SURVIVED", False: "killed", None: "timeout"}[passed]
            print(json.dumps({"line": m.line, "function": m.function, "change": m.change, "verdict": verdict,
                              "seconds": round(time.time() - start, 1)}), flush=True)
    print(f"{survivors} of {len(todo)} survived")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
