"""Where a stage's rows come from: a local file, a local folder laid out by split, or a hub dataset,
with a split and a row range per source.

A source is ``<where>[:<split>][[<start>:<stop>]]``:

    data/world/sft_train.jsonl                     a local .json / .jsonl / .parquet file
    Anthropic/hh-rlhf:test                         a hub dataset id and its split (none given: data.hub_split)
    tests/fixtures/hub/hh_rlhf:test                a local folder laid out like the hub's splits:
                                                   <folder>/test.jsonl (or .json, .parquet)
    HuggingFaceH4/ultrafeedback_binarized:train_prefs[:2000]   the first 2000 rows (datasets' own slice
                                                   syntax); [:None], what ``[:${data.max_rows}]`` becomes
                                                   with data.max_rows=null, reads them all

A local folder stands in for a hub id without a hub: the presets in conf/data/ write their sources as
``${data.hub.<name>}:<split>[:${data.max_rows}]``, so ``data.hub.<name>=<folder>`` swaps one set for a
local copy (tests/fixtures/hub/ holds small ones in exactly the hub's layout).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.core.errors import PipelineError

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SOURCE = re.compile(r"(?P<where>.+?)(?::(?P<split>[\w.-]+))?(?:\[(?P<start>-?\d+|None)?:(?P<stop>-?\d+|None)?\])?")

Row = dict[str, Any]


@dataclass(frozen=True)
class Source:
    where: str  # a file, a folder or a hub id
    split: Optional[str]  # None: data.hub_split
    rows: slice  # which rows, as a Python slice (slice(None): all)


def parse_source(source: str) -> Source:
    """``"a/b:test[:100]"`` -> Source("a/b", "test", slice(None, 100))."""
    m = _SOURCE.fullmatch(source)
    if m is None:  # only an empty string gets here
        raise PipelineError(f"data source {source!r} is empty: give a file, a folder or a hub id (owner/name)")
    bound = [None if v in (None, "None") else int(v) for v in (m["start"], m["stop"])]
    return Source(m["where"], m["split"], slice(*bound))


def read_rows(source: str, hub_split: str) -> tuple[list[Row], str, Callable[[int], str]]:
    """Rows of one source, the source's name, and a function that names row i within it
    (``where = f"{name}, {label(i)}"`` in messages).

    JSONL rows are named by their 1-based line number, since that is what an editor shows; a row
    range keeps each row's name in the whole file.
    """
    spec = parse_source(source)
    path = Path(spec.where)
    if path.suffix in LOCAL_SUFFIXES:
        if spec.split is not None:
            raise PipelineError(f"data source {source!r}: a file has no splits; drop `:{spec.split}`, or name "
                                "a folder laid out by split (<folder>/<split>.jsonl) or a hub id")
        rows, name, label = _read_file(path)
    elif path.is_dir():
        rows, name, label = _read_file(_split_file(path, spec.split or hub_split))
    elif path.exists() or spec.where.count("/") != 1 or spec.where.startswith((".", "/")):
        problem = "is not there" if not path.exists() else "is not a .json/.jsonl/.parquet file"
        raise PipelineError(f"data source {source!r}: {spec.where} {problem}; give a .json/.jsonl/.parquet file, "
                            "a folder laid out by split (<folder>/<split>.jsonl), or a hub dataset id (owner/name).")
    else:
        return _read_hub(spec.where, spec.split or hub_split, spec.rows)
    kept = range(len(rows))[spec.rows]
    return [rows[i] for i in kept], name, lambda i: label(kept[i])


def _split_file(folder: Path, split: str) -> Path:
    """``<folder>/<split>.jsonl`` (or .json, .parquet): one file per split, as the hub names them."""
    found = [folder / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if len(found) != 1:
        have = sorted({p.stem for p in folder.iterdir() if p.suffix in LOCAL_SUFFIXES})
        problem = "has no" if not found else "has more than one file for"
        raise PipelineError(f"{folder} {problem} split {split!r} (<folder>/{split}.jsonl, .json or .parquet); "
                            f"its splits: {', '.join(have) or 'none'}. Fix the `:<split>` of the source, or "
                            "data.hub_split.")
    return found[0]


def _read_file(path: Path) -> tuple[list[Row], str, Callable[[int], str]]:
    if not path.is_file():
        raise PipelineError(f"data file {path} not found. Run `make data` for the embedded "
                            "world, or fix the path in the `data` config.")
    if path.suffix == ".jsonl":
        rows, lines = _read_jsonl(path)
        return rows, str(path), lambda i: f"line {lines[i]}"
    from datasets import load_dataset

    try:
        ds = load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - arrow raises many types for a bad file
        raise PipelineError(f"{path}: could not be read as {path.suffix} ({e}). Fix the file.") from e
    return list(ds), str(path), lambda i: f"row {i}"


def _read_jsonl(path: Path) -> tuple[list[Row], list[int]]:
    """The rows, and each row's 1-based line number (blank lines are skipped, not counted out)."""
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column "
                                    f"{e.colno}). Fix or remove the line.") from e
            if not isinstance(row, dict):
                raise PipelineError(f"{path}, line {lineno}: expected a JSON object, got "
                                    f"{type(row).__name__}. Fix or remove the line.")
            rows.append(row)
            lines.append(lineno)
    return rows, lines


def _read_hub(name: str, split: str, rows: slice) -> tuple[list[Row], str, Callable[[int], str]]:
    from datasets import load_dataset  # a hub id: only works where a hub is reachable
    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        raise PipelineError(f"could not load hub dataset {name!r} (split {split!r}): {e}") from e
    kept = range(len(ds))[rows]
    return list(ds.select(kept)), f"hub dataset {name}:{split}", lambda i: f"row {kept[i]}"
