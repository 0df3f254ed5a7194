"""Reward models against the gold judge, without RL: `make bench ARGS="rm_agreement ..."`.

RL can only improve what its reward sees. On the embedded world `make eval` reports how often the
run's RM orders two stages' answers as the gold judge does, by category (``rm_agreement``; pipeline/
eval/judge.py ``agreement_by_category``). This scores the answers one eval artifact saved
(``responses.jsonl``: every stage under every decoding, with gold scores) with other RM artifacts,
so RM settings can be compared on the same answers in seconds instead of one RL run each. The
measure is the report's: pairs of stages on one prompt and decoding, ties in either scorer left out,
50% chance. Use an eval of the val prompts (`make eval ARGS="prompts=val"`) to choose settings.

    make bench ARGS="rm_agreement --responses artifacts/final/eval/responses.jsonl artifacts/final/rm artifacts/rm2/rm"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.artifacts import load_artifact  # noqa: E402
from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.eval.judge import Scores, agreement_by_category  # noqa: E402
from pipeline.models.reward import score_conversations, standalone_reward_model  # noqa: E402


def read_responses(path: Path) -> tuple[list[dict], Scores]:
    """The rows of an eval artifact's ``responses.jsonl`` and their gold scores ``[stage][decoding][i]``;
    refused when the prompts are not the world's (no gold score to agree with)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise PipelineError(f"{path}: no responses; pass the responses.jsonl of a finished `make eval`")
    gold = {s: {d: [] for d in by_dec} for s, by_dec in rows[0]["responses"].items()}
    for n, row in enumerate(rows, 1):
        for s, by_dec in gold.items():
            for d, scores in by_dec.items():
                score = row["responses"][s][d]["gold_score"]
                if score is None:
                    raise PipelineError(f"{path}, line {n}: no gold score ({s}, {d}): these prompts are not the "
                                        "embedded world's, so there is nothing to agree with")
                scores.append(score)
    return rows, gold


def rm_scores(rm_path: str, rows: list[dict], stages: Scores, batch_size: int) -> Scores:
    """The RM artifact's score of every saved answer, ``[stage][decoding][i]``."""
    rm = load_artifact(rm_path, "rm")
    model, fmt = standalone_reward_model(rm, OmegaConf.create(rm.manifest["config"]["model"]))
    cells = [(s, d) for s, by_dec in stages.items() for d in by_dec]
    prompts = [[{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
               for r in rows]
    flat = score_conversations(model, fmt, [p for _ in cells for p in prompts],
                               [[{"role": "assistant", "content": r["responses"][s][d]["response"]}]
                                for s, d in cells for r in rows], batch_size).tolist()
    out: Scores = {s: {} for s in stages}
    for k, (s, d) in enumerate(cells):
        out[s][d] = flat[k * len(rows):(k + 1) * len(rows)]
    return out


def table(results: dict[str, dict[str, dict[str, dict]]]) -> str:
    """One row per RM, one column per category and decoding: ``share (pairs)``."""
    first = next(iter(results.values()))
    cols = [(c, d) for c in first for d in first[c]]
    lines = ["| RM | " + " | ".join(f"{c} ({d})" for c, d in cols) + " |", "|---|" + "---:|" * len(cols)]
    for rm, by_cat in results.items():
        lines.append(f"| {rm} | " + " | ".join(
            "n/a" if by_cat[c][d]["share"] is None else f"{by_cat[c][d]['share']:.1%} ({by_cat[c][d]['pairs']})"
            for c, d in cols) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=Path, required=True, help="an eval artifact's responses.jsonl")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("rms", nargs="+", help="rm artifact folders, e.g. artifacts/final/rm")
    args = parser.parse_args(argv)
    rows, gold = read_responses(args.responses)
    categories = [r["category"] for r in rows]
    results = {rm: agreement_by_category(rm_scores(rm, rows, gold, args.batch_size), gold, categories)
               for rm in args.rms}
    print(f"# RM vs gold judge on {args.responses} ({len(rows)} prompts): agreement (pairs)\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
