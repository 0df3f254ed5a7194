"""Reading and validating training data before any training starts.

Sources are local ``.json`` / ``.jsonl`` / ``.parquet`` files, local folders laid out by split, or
hub dataset ids, each with its own split and row range (``Anthropic/hh-rlhf:test[:500]``, see
pipeline/data/sources.py). Every row is checked against the formats a stage accepts. A bad row is left
out and counted by reason (``data.bad_rows=skip``, see pipeline/data/bad_rows.py), or stops the
run with its file, row and field named, and the fix (``data.bad_rows=error``).

Everything is normalised to the conversational form (lists of ``{"role", "content"}``),
so one chat template formats training, generation and scoring alike. Public layouts are read
as they ship: Anthropic HH-RLHF's raw ``"\n\nHuman: ... \n\nAssistant: ..."`` transcripts,
UltraFeedback-binarized's explicit prompt plus whole conversations (the prompt is kept once),
TRL's implicit-prompt pairs, Alpaca; ``data.columns`` renames other fields
(``{prompt: question, chosen: response_j, rejected: response_k}``).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Callable, Iterable, Optional

from pipeline.core.errors import PipelineError
from pipeline.data.bad_rows import DataReport, SourceTally, check_bad_rows, note_merged_turns, watching_merges
from pipeline.data.chat import ChatFormat, ConversationError
from pipeline.data.sources import read_rows

ROLES = {"system", "user", "assistant"}

Row = dict[str, Any]


class RowError(ValueError):
    """A malformed row: raised by the validators with the offending field and ``reason``, a key of
    ``bad_rows.REASONS`` (its skip count), or None when only a setting makes it bad (never skipped)."""

    def __init__(self, field: str, problem: str, reason: Optional[str] = "malformed"):
        super().__init__(f"field `{field}` {problem}")
        self.field = field
        self.reason = reason


# --- reading: files, folders laid out by split, hub ids (pipeline/data/sources.py) ----------------


def load_validated(sources: Iterable[str], hub_split: str, normalise: Callable[[Row], list[Row]],
                   columns: Optional[dict[str, str]] = None, bad_rows: str = "error",
                   report: Optional[DataReport] = None) -> list[Row]:
    """Read every source and normalise each row.

    ``columns`` maps the pipeline's field names to a dataset's own (``{"prompt": "question"}``):
    a row that has the dataset's field is read as if it had the pipeline's. ``bad_rows``: "error"
    raises PipelineError at the first bad row; "skip" leaves bad rows out, prints one line per
    reason and file, and adds the counts to ``report`` (``report.metrics()``: the stage's metrics).
    Merged HH-RLHF turns are printed and counted either way. See pipeline/data/bad_rows.py.
    """
    check_bad_rows(bad_rows)
    report = DataReport() if report is None else report
    out: list[Row] = []
    for source in sources:
        rows, name, label = read_rows(source, hub_split)
        if not rows:
            raise PipelineError(f"{source} holds no rows.")
        tally = SourceTally(name)
        for i, row in enumerate(rows):
            try:
                with watching_merges() as merges:
                    normalised = normalise(rename_columns(row, columns or {}))
            except RowError as e:
                if bad_rows == "error" or e.reason is None:
                    skip = "" if e.reason is None else (", or set data.bad_rows=skip to leave such rows out "
                                                        "(counted and reported)")
                    raise PipelineError(f"{name}, {label(i)}: {e}. Fix or remove the row{skip}.") from e
                tally.skip(e.reason, label(i), str(e))
                continue
            if merges:
                tally.merge(label(i))
            out.extend(normalised)
        tally.close(len(rows), report)
    return out


def rename_columns(row: Row, columns: dict[str, str]) -> Row:
    """``columns`` is ``{ours: theirs}``; a row's ``theirs`` field becomes ``ours``."""
    if not columns:
        return row
    row = dict(row)
    for ours, theirs in columns.items():
        if theirs in row:
            row[ours] = row.pop(theirs)
    return row


# --- field checks -----------------------------------------------------------------------


def _text(row: Row, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise RowError(field, "is missing" if value is None else f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "is empty", "empty_turn")
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
            raise RowError(f"{field}[{j}].content", "must be a non-empty string",
                           "empty_turn" if isinstance(content, str) else "malformed")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _turn(value: Any, field: str, role: str) -> list[Row]:
    """A prompt or response given as text or as messages, in message form."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "is empty", "empty_turn")
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
      optional ``input`` is appended to the instruction;
    - a preference row (``chosen`` without ``completion``): its chosen conversation, an HH-RLHF
      transcript or messages, or ``prompt`` followed by the ``chosen`` response.
    """
    if "chosen" in row and "messages" not in row and "completion" not in row:
        if "prompt" in row:
            prompt = _turn(row["prompt"], "prompt", "user")
            return sft_row({"messages": prompt + _response(row["chosen"], "chosen", prompt)})
        return sft_row({"messages": _conversation(row["chosen"], "chosen")})
    if "messages" in row:
        msgs = _messages(row["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise RowError(f"messages[{len(msgs) - 1}].role",
                           "must be 'assistant': a demonstration ends with the answer")
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

    - ``prompt`` / ``chosen`` / ``rejected``: text or messages, optional numeric ``margin``. A
      response given as the whole conversation (UltraFeedback-binarized repeats the user turn in
      ``chosen`` and ``rejected``) must start with the prompt, which is then kept once;
    - ``chosen`` / ``rejected`` with an implicit prompt: the shared leading messages, as
      conversations or as HH-RLHF transcripts (``"\n\nHuman: ...\n\nAssistant: ..."``);
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
        responses = [_response(r, f"ranked[{j}]", prompt) for j, r in enumerate(ranked)]
        scale = 1.0 if margin is None else margin
        return [_pair(prompt, responses[i], responses[j], scale * (j - i))
                for i, j in expand_ranking(list(range(len(responses))))]
    if "chosen" not in row or "rejected" not in row:
        missing = "chosen" if "chosen" not in row else "rejected"
        raise RowError(missing, "is missing: a row needs `chosen` and `rejected` (and optionally "
                                "`prompt`), or `prompt` and `ranked`")
    if "prompt" in row:
        prompt = _turn(row["prompt"], "prompt", "user")
        return [_pair(prompt, _response(row["chosen"], "chosen", prompt),
                      _response(row["rejected"], "rejected", prompt), margin)]
    chosen, rejected = _conversation(row["chosen"], "chosen"), _conversation(row["rejected"], "rejected")
    prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    return [_pair(prompt, chosen, rejected, margin)]


def _response(value: Any, field: str, prompt: list[Row]) -> list[Row]:
    """A response as text or messages. Messages that hold other roles are a whole conversation
    and must begin with the prompt, which is cut off so that it appears once."""
    if isinstance(value, str) or value is None:
        return _turn(value, field, "assistant")
    msgs = _messages(value, field)
    if all(m["role"] == "assistant" for m in msgs):
        return msgs
    if msgs[: len(prompt)] != prompt:
        raise RowError(field, "is a whole conversation that does not begin with `prompt`; give the "
                              "response alone, or the conversation starting with the prompt's messages")
    if len(msgs) == len(prompt):
        raise RowError(field, "holds the prompt but no response after it")
    return msgs[len(prompt):]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str, field: str) -> list[Row]:
    """An HH-RLHF transcript ``"\n\nHuman: q\n\nAssistant: a..."`` as messages.

    Consecutive turns of one speaker (the released set has two Human turns in a row) are merged,
    their texts joined by a blank line: always, not per model family, since some templates demand
    alternating turns (Mistral's and Gemma's raise) and every other one accepts them, so all
    families train on the same conversation. Each merge is counted and printed (``merged_turns``).
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(field, "is text that is not an HH-RLHF transcript (\"\\n\\nHuman: ...\\n\\nAssistant: "
                              "...\"); give messages, or add a `prompt` field")
    msgs: list[Row] = []
    merged = 0
    for k, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2])):
        if not content.strip():
            raise RowError(field, f"turn {k} ({speaker}) is empty", "empty_turn")
        role = _HH_ROLES[speaker]
        if msgs and msgs[-1]["role"] == role:
            msgs[-1] = {"role": role, "content": f"{msgs[-1]['content']}\n\n{content.strip()}"}
            merged += 1
        else:
            msgs.append({"role": role, "content": content.strip()})
    if merged:
        note_merged_turns(merged)
    return msgs


def _conversation(value: Any, field: str) -> list[Row]:
    """A whole conversation: messages, or an HH-RLHF transcript."""
    if isinstance(value, str):
        return parse_transcript(value, field)
    return _messages(value, field)


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
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if response[-1]["role"] != "assistant":
            raise RowError(field, "must end with an assistant turn: the response is what the reward model scores")
    if prompt[-1]["role"] != "user":
        raise RowError("prompt", "must end with a user turn")
    if chosen == rejected:
        raise RowError("rejected", "equals `chosen`: a comparison needs two different responses", "identical_pair")
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
           "group": json.dumps(prompt)}  # a prompt's pairs share a group (batched together)
    if margin is not None:
        row["margin"] = float(margin)
    return row


def margin_preference_rows(row: Row) -> list[Row]:
    """:func:`preference_rows` for ``train.use_margin=true``: every comparison needs a margin."""
    pairs = preference_rows(row)
    if any("margin" not in p for p in pairs):
        raise RowError("margin", "is missing: train.use_margin=true needs a numeric `margin` on every "
                                 "comparison (ranked lists get one from their ranks); add it or set "
                                 "train.use_margin=false", None)  # the setting's problem: never skipped
    return pairs


# --- prompts ------------------------------------------------------------------------------


def prompt_row(row: Row) -> list[Row]:
    """A prompt for RL or evaluation, as given plus ``messages``: the conversation to answer.

    ``prompt`` is text (one user turn) or messages (a system turn, several turns); a ``messages``
    field works too. The conversation must end with a user turn. Extra fields are kept. A
    preference row without either (HH-RLHF) gives its ``chosen`` conversation up to the last user
    turn, whatever followed it (an empty final answer included).
    """
    if "prompt" not in row and "messages" not in row and "chosen" in row:
        msgs = conversation_prompt(row["chosen"], "chosen")
        return [{**row, "prompt": msgs, "messages": msgs}]
    field = "prompt" if "prompt" in row or "messages" not in row else "messages"
    msgs = _turn(row.get(field), field, "user")
    if msgs[-1]["role"] != "user":
        raise RowError(f"{field}[{len(msgs) - 1}].role", "must be 'user': a prompt ends with the turn to answer")
    return [{**row, "prompt": row[field], "messages": msgs}]


def conversation_prompt(value: Any, field: str) -> list[Row]:
    """A conversation (messages, or an HH-RLHF transcript cut before its last answer) up to its last user turn."""
    if isinstance(value, str) and value.rfind("\n\nAssistant:") > value.rfind("\n\nHuman:"):
        value = value[: value.rfind("\n\nAssistant:")]  # the last answer is not read: it may be empty
    msgs = _conversation(value, field)
    users = [j for j, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        raise RowError(field, "has no user turn to answer")
    return msgs[: users[-1] + 1]


def text_row(row: Row) -> list[Row]:
    """A pretraining document: ``{"text": str}`` (PPO-ptx, held-out perplexity)."""
    return [{"text": _text(row, "text")}]


def prompt_text(prompt: Any) -> str:
    """A prompt for display and reward callables: text as is, messages as their last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# --- tokenized examples -----------------------------------------------------------------------


def _encode(fn: Callable[[], Any], field: str):
    try:
        return fn()
    except ConversationError as e:
        raise RowError(field, str(e), "template_refused") from None


def sft_example(fmt: ChatFormat, row: Row) -> Row:
    """``{"input_ids", "assistant_masks"}`` of one demonstration (mask 1 on the answers' tokens)."""
    ids, mask = _encode(lambda: fmt.conversation(row["messages"]), "messages")
    return {"input_ids": ids, "assistant_masks": mask}


def preference_example(fmt: ChatFormat, row: Row) -> Row:
    """A pair as the ids the RM reads (:meth:`ChatFormat.scored_ids`), plus the prompt's own ids."""
    out = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    out["prompt_ids"] = _encode(lambda: fmt.prompt_ids(row["prompt"]), "prompt")
    for side in ("chosen", "rejected"):
        ids = _encode(lambda: fmt.scored_ids(row["prompt"], row[side]), side)
        if ids[: len(out["prompt_ids"])] != out["prompt_ids"]:
            raise RowError(side, "does not tokenize with the prompt's ids as its start")
        out[f"{side}_ids"] = ids
    return out


def tokenized(normalise: Callable[[Row], list[Row]], encode: Callable[[Row], Row]) -> Callable[[Row], list[Row]]:
    """``normalise`` then ``encode`` each result, so a conversation the chat template refuses is
    reported with its file and line like any other malformed row."""
    return lambda row: [encode(r) for r in normalise(row)]
