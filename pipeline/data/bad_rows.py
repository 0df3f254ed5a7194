"""Rows a data set ships broken: left out and counted by reason, or fatal (``data.bad_rows``).

Released sets carry rows no stage can train on: Anthropic HH-RLHF has transcripts whose final turn
is empty and pairs whose ``chosen`` equals ``rejected``. With ``data.bad_rows=skip`` (the default in
conf/data/) such a row is left out, and every skip is counted by reason, printed (one line per
reason and file, with the first offending row as an example) and recorded in the stage's metrics
and W&B run as ``data/skipped_<reason>``. ``data.bad_rows=error`` stops at the first bad row,
naming its file, line and field. A file whose every row is bad stops the run either way (a wrong
layout or ``data.columns``, not a few bad rows), and so does a row that only a setting makes bad
(a missing ``margin`` under ``train.use_margin=true``).

The one change made to rows that are kept: consecutive turns of one speaker in an HH-RLHF
transcript are merged into one turn (see :func:`pipeline.data.layouts.parse_transcript`). That is
not a skip; it is counted apart as ``data/merged_turns`` (rows changed) and printed too.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Optional

from pipeline.core.errors import ConfigError, PipelineError

BAD_ROWS = ("skip", "error")

# Why a row was left out: the key of its ``data/skipped_<reason>`` metric, and what it means.
REASONS = {
    "empty_turn": "an empty turn or field",
    "identical_pair": "`chosen` equals `rejected`",
    "template_refused": "a conversation the chat template refuses",
    "malformed": "fits no accepted layout",
}
MERGED = "merged_turns"


def check_bad_rows(value: object) -> str:
    if value not in BAD_ROWS:
        raise ConfigError(f"data.bad_rows={value!r} must be one of 'skip' (leave bad rows out, counted and "
                          "reported) or 'error' (stop at the first); fix the override or conf/data/")
    return value


@dataclass
class DataReport:
    """What loading did to a stage's data, summed over every file it read: rows skipped by
    reason, and rows whose consecutive same-speaker turns were merged."""

    skipped: Counter = field(default_factory=Counter)
    merged: int = 0

    def metrics(self) -> dict[str, int]:
        """``data/skipped_<reason>`` for every reason (0 included) and ``data/merged_turns``."""
        return {**{f"data/skipped_{r}": self.skipped.get(r, 0) for r in REASONS}, f"data/{MERGED}": self.merged}


class SourceTally:
    """One file's skips and merges, each with its first row as the example; reported on close."""

    def __init__(self, name: str):
        self.name = name
        self.skips: dict[str, list] = {}  # reason -> [count, first row, its problem]
        self.merges: list = [0, None]  # [rows, first row]

    def skip(self, reason: str, row: str, problem: str) -> None:
        self.skips.setdefault(reason, [0, row, problem])[0] += 1

    def merge(self, row: str) -> None:
        self.merges = [self.merges[0] + 1, self.merges[1] or row]

    def close(self, n_rows: int, report: DataReport) -> None:
        """Print one line per reason, add the counts to ``report``; raise if no row is left."""
        n_skipped = sum(n for n, _, _ in self.skips.values())
        if n_skipped == n_rows:
            reason, (_, row, problem) = next(iter(self.skips.items()))
            counts = ", ".join(f"{r}: {n}" for r, (n, _, _) in self.skips.items())
            raise PipelineError(f"all {n_rows} rows of {self.name} were skipped as bad rows ({counts}); first: "
                                f"{row}: {problem}. Check the file's layout (data.columns renames fields) "
                                "or fix the file.")
        for reason, (n, row, problem) in self.skips.items():
            print(f"data: skipped {n} of {n_rows} rows of {self.name}: {reason} ({REASONS[reason]}), "
                  f"e.g. {row}: {problem}")
            report.skipped[reason] += n
        if self.merges[0]:
            print(f"data: {MERGED}: joined consecutive same-speaker turns (texts separated by a blank line) in "
                  f"{self.merges[0]} of {n_rows} rows of {self.name}, e.g. {self.merges[1]}")
            report.merged += self.merges[0]


# Merges happen deep inside a row's parsing; the row being loaded collects them here.
_MERGES: ContextVar[Optional[list]] = ContextVar("merged_turns", default=None)


def note_merged_turns(n: int) -> None:
    """Record that the row being loaded had ``n`` turns merged into the turn before them."""
    notes = _MERGES.get()
    if notes is not None:
        notes.append(n)


@contextmanager
def watching_merges() -> Iterator[list]:
    """Collect :func:`note_merged_turns` calls made while one row is normalised."""
    notes: list = []
    token = _MERGES.set(notes)
    try:
        yield notes
    finally:
        _MERGES.reset(token)
