"""Reading and validating training data before any training starts.

Sources are local ``.json`` / ``.jsonl`` / ``.parquet`` files (read with ``datasets``) or
hub dataset ids. Every row is checked against the formats a stage accepts, and the
first bad row stops the run with its file, row and field named, and the fix.

Everything is normalised to the conversational form (lists of ``{"role", "content"}``),
so one chat template formats training, generation and scoring alike.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterable

from datasets import Dataset

from pipeline.runtime import PipelineError

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant"}

Row = dict[str, Any]


class RowError(ValueError):
    """A malformed row: raised by the validators with the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field `{field}` {problem}")
        self.field = field


# --- reading --------------------------------------------------------------------------


def read_rows(source: str, hub_split: str) -> tuple[list[Row], Callable[[int], str]]:
    """Rows of one source, and a function that names row i for error messages.

    JSONL rows are named by their 1-based line number, since that is what an editor shows.
    """
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise PipelineError(f"data file {path} not found. Run `make data` for the embedded "
                                "world, or fix the path in the `data` config.")
        if path.suffix == ".jsonl":
            rows, lines = _read_jsonl(path)
            return rows, lambda i: f"{path}, line {lines[i]}"
        ds = _load_local(path)
        return list(ds), lambda i: f"{path}, row {i}"
    if path.exists() or "/" not in source:
        raise PipelineError(f"data source {source!r} is neither a .json/.jsonl/.parquet file nor a "
                            "hub dataset id (owner/name).")
    from datasets import load_dataset  # a hub id: only works where a hub is reachable
    try:
        ds = load_dataset(source, split=hub_split)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        raise PipelineError(f"could not load hub dataset {source!r} (split {hub_split!r}): {e}") from e
    return list(ds), lambda i: f"hub dataset {source}, row {i}"


def _read_jsonl(path: Path) -> tuple[list[Row], list[int]]:
    """The rows, and each row's 1-based line number (blank lines are skipped, not counted out)."""
    import json

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


def _load_local(path: Path) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - arrow raises many types for a bad file
        raise PipelineError(f"{path}: could not be read as {path.suffix} ({e}). Fix the file.") from e


def load_validated(sources: Iterable[str], hub_split: str,
                   normalise: Callable[[Row], list[Row]]) -> list[Row]:
    """Read every source and normalise each row; the first bad row raises PipelineError."""
    out: list[Row] = []
    for source in sources:
        rows, where = read_rows(source, hub_split)
        if not rows:
            raise PipelineError(f"{source} holds no rows.")
        for i, row in enumerate(rows):
            try:
                out.extend(normalise(row))
            except RowError as e:
                raise PipelineError(f"{where(i)}: {e}. Fix or remove the row.") from e
    return out


# --- field checks -----------------------------------------------------------------------


def _text(row: Row, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise RowError(field, "is missing" if value is None else f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "is empty")
    return value


def _messages(value: Any, field: str) -> list[Row]:
    if not isinstance(value, list) or not value:
        raise RowError(field, "must be a non-empty list of {role, content} messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f"{field}[{j}]", "must be an object with `role` and `content`")
        if m.get("role") not in ROLES:
            raise RowError(f"{field}[{j}].role", f"must be one of {sorted(ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"{field}[{j}].content", "must be a non-empty string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _turn(value: Any, field: str, role: str) -> list[Row]:
    """A prompt or response given as text or as messages, in message form."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "is empty")
        return [{"role": role, "content": value}]
    if value is None:
        raise RowError(field, "is missing")
    return _messages(value, field)


# --- SFT ---------------------------------------------------------------------------------


def sft_row(row: Row) -> list[Row]:
    """One demonstration as ``{"messages": [...]}`` from any accepted layout.

    - ``messages``: a conversation ending with an assistant turn;
    - ``prompt`` / ``completion``: text or messages;
    - ``instruction`` / ``input`` / ``output``: the Alpaca / InstructGPT layout, where the
      optional ``input`` is appended to the instruction.
    """
    if "messages" in row:
        msgs = _messages(row["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise RowError(f"messages[{len(msgs) - 1}].role", "must be 'assistant': a demonstration ends with the answer")
        if not any(m["role"] == "user" for m in msgs):
            raise RowError("messages", "has no user turn")
        return [{"messages": msgs}]
    if "prompt" in row or "completion" in row:
        return [{"messages": _turn(row.get("prompt"), "prompt", "user")
                 + _turn(row.get("completion"), "completion", "assistant")}]
    if "instruction" in row or "output" in row:
        instruction = _text(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RowError("input", "must be a string")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"messages": [{"role": "user", "content": user},
                              {"role": "assistant", "content": _text(row, "output")}]}]
    raise RowError("messages", "is missing: a row needs `messages`, `prompt`+`completion`, "
                               "or `instruction`+`output`")


# --- preferences --------------------------------------------------------------------------


def preference_rows(row: Row) -> list[Row]:
    """Pairwise rows ``{"prompt", "chosen", "rejected", "group"[, "margin"]}`` from any layout.

    - ``prompt`` / ``chosen`` / ``rejected``: text or messages, optional numeric ``margin``;
    - ``chosen`` / ``rejected`` with an implicit prompt: the shared leading messages;
    - ``prompt`` / ``ranked``: K responses best first, expanded to all K(K-1)/2 pairs; a
      pair's margin is its distance in the ranking (j - i), times ``margin`` if given.

    ``group`` identifies the prompt, so a prompt's pairs can be batched together.
    """
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise RowError("margin", "must be a number")
    if "ranked" in row:
        prompt = _turn(row.get("prompt"), "prompt", "user")
        ranked = row["ranked"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise RowError("ranked", "must be a list of at least 2 responses, best first")
        responses = [_turn(r, f"ranked[{j}]", "assistant") for j, r in enumerate(ranked)]
        scale = 1.0 if margin is None else margin
        return [_pair(prompt, responses[i], responses[j], scale * (j - i))
                for i, j in expand_ranking(list(range(len(responses))))]
    if "chosen" not in row or "rejected" not in row:
        missing = "chosen" if "chosen" not in row else "rejected"
        raise RowError(missing, "is missing: a row needs `chosen` and `rejected` (and optionally "
                                "`prompt`), or `prompt` and `ranked`")
    if "prompt" in row:
        prompt = _turn(row["prompt"], "prompt", "user")
        return [_pair(prompt, _turn(row["chosen"], "chosen", "assistant"),
                      _turn(row["rejected"], "rejected", "assistant"), margin)]
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    return [_pair(prompt, chosen, rejected, margin)]


def expand_ranking(ranked: list[Any]) -> list[tuple[Any, Any]]:
    """All (better, worse) pairs of a best-first list: K responses give K(K-1)/2 pairs."""
    return list(itertools.combinations(ranked, 2))


def split_shared_prefix(chosen: list[Row], rejected: list[Row]) -> tuple[list[Row], list[Row], list[Row]]:
    """Implicit prompt: the leading messages both conversations share."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RowError("chosen", "and `rejected` share no leading messages, so there is no implicit "
                                 "prompt; add a `prompt` field")
    return chosen[:n], chosen[n:], rejected[n:]


def _pair(prompt: list[Row], chosen: list[Row], rejected: list[Row], margin) -> Row:
    if chosen == rejected:
        raise RowError("rejected", "equals `chosen`: a comparison needs two different responses")
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
           "group": prompt[-1]["content"]}
    if margin is not None:
        row["margin"] = float(margin)
    return row


def margin_preference_rows(row: Row) -> list[Row]:
    """:func:`preference_rows` for ``train.use_margin=true``: every comparison needs a margin."""
    pairs = preference_rows(row)
    if any("margin" not in p for p in pairs):
        raise RowError("margin", "is missing: train.use_margin=true needs a numeric `margin` on every "
                                 "comparison (ranked lists get one from their ranks); add it or set "
                                 "train.use_margin=false")
    return pairs


# --- prompts ------------------------------------------------------------------------------


def prompt_row(row: Row) -> list[Row]:
    """A prompt for PPO or evaluation: ``{"prompt": str}`` (extra fields are kept)."""
    _text(row, "prompt")
    return [dict(row)]
