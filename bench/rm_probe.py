"""Does the RM mark down a refusal that names the wrong thing? `make bench ARGS="rm_probe ..."`.

On the world the RL policies answer questions about unknown countries with the refusal template,
"I don't know. I have no information about <country>." The tiny model sometimes copies the name
badly and writes one of the world's cities instead, which the gold judge scores as a hallucination
(-1, like an invented answer). With `world.misnamed_refusals=false` (the default before d2f611d)
the labellers' comparisons never hold such a refusal (they compare the right refusal, an invented
answer and a generic one: pipeline/world/responses.py), so how far the RM marks it down is whatever
it generalised to, and RL only learns to copy the name as far as the RM pays for it. For each
unanswerable prompt an eval artifact saved, this scores three answers with an RM artifact: the
right refusal, the refusal naming a random city of the world, and an invented answer. Diagnosis,
not a choice: it reads only the saved prompts.

    make bench ARGS="rm_probe --responses artifacts/final/eval/responses.jsonl artifacts/final/rm"
    make bench ARGS="rm_probe --responses ... --world-seed 4 artifacts/final/rm"   # another world's RM
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rm_agreement import read_responses  # noqa: E402
from pipeline.core.artifacts import load_artifact  # noqa: E402
from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.models.reward import score_conversations, standalone_reward_model  # noqa: E402
from pipeline.world.entities import World, WorldConfig, world_from_config  # noqa: E402
from pipeline.world.judge import judge, parse_prompt  # noqa: E402
from pipeline.world.responses import hallucinated_response  # noqa: E402
from pipeline.world.vocabulary import UNKNOWN_ANSWER  # noqa: E402

KINDS = ("right", "wrong_name", "invented")


def probe_answers(prompts: list[str], world: World, seed: int = 0) -> list[dict[str, str]]:
    """Per unanswerable prompt, the three answers of ``KINDS``; the gold judge scores them 1, -1, -1."""
    rng = random.Random(seed)
    out = []
    for prompt in prompts:
        task = parse_prompt(prompt, world)
        out.append({"right": UNKNOWN_ANSWER.format(c=task.subject),
                    "wrong_name": UNKNOWN_ANSWER.format(c=rng.choice(world.values("capital"))),
                    "invented": hallucinated_response(task, world, rng)})
    return out


def summarise(scores: dict[str, list[float]]) -> dict[str, float]:
    """Mean RM score per kind, the share of prompts where the right refusal outscores the wrong
    name, and the mean gap between them (the reward RL sees for copying the name right)."""
    right, wrong = scores["right"], scores["wrong_name"]
    out = {f"mean_{k}": statistics.fmean(v) for k, v in scores.items()}
    out["right_over_wrong_name"] = sum(a > b for a, b in zip(right, wrong)) / len(right)
    out["gap_right_minus_wrong_name"] = statistics.fmean(a - b for a, b in zip(right, wrong))
    return out


def world_of(seed: int) -> World:
    """The world of conf/world/default.yaml at this seed (the judge's, as `make eval` builds it)."""
    cfg = OmegaConf.load(ROOT / "conf/world/default.yaml")
    cfg.seed = seed
    return world_from_config(WorldConfig(**OmegaConf.to_container(cfg)))


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=Path, required=True, help="an eval artifact's responses.jsonl")
    parser.add_argument("--world-seed", type=int, default=0, help="the world the prompts are from (world.seed)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("rm", help="an rm artifact folder, e.g. artifacts/final/rm")
    args = parser.parse_args(argv)
    rows, _ = read_responses(args.responses)
    world = world_of(args.world_seed)
    prompts = [r["prompt"] for r in rows if r["category"] == "unanswerable"]
    if not prompts:
        raise PipelineError(f"{args.responses}: no unanswerable prompts; pass the responses.jsonl of a "
                            "`make eval` on the world's prompts")
    # Another world's cities would mean nothing to this RM: the prompts must ask about this world's
    # own unknown countries, and the three answers must score as the probe says.
    answers = probe_answers(prompts, world)
    for prompt, by_kind in zip(prompts, answers):
        got = {k: judge(prompt, text, world).score for k, text in by_kind.items()}
        if (parse_prompt(prompt, world).subject not in world.unknown
                or got != {"right": 1.0, "wrong_name": -1.0, "invented": -1.0}):
            raise PipelineError(f"{args.responses}: {prompt!r} does not ask about an unknown country of world "
                                f"seed {args.world_seed}; pass the --world-seed its eval ran with (the probe builds "
                                "conf/world/default.yaml's world at that seed)")
    rm = load_artifact(args.rm, "rm")
    model, fmt = standalone_reward_model(rm, OmegaConf.create(rm.manifest["config"]["model"]))
    flat = score_conversations(model, fmt, [[{"role": "user", "content": p}] for p in prompts for _ in KINDS],
                               [[{"role": "assistant", "content": a[k]}] for a in answers for k in KINDS],
                               args.batch_size).tolist()
    result = summarise({k: flat[i::len(KINDS)] for i, k in enumerate(KINDS)})
    print(f"# {args.rm} on {len(prompts)} unanswerable prompts of {args.responses} (world seed {args.world_seed})\n")
    print("| right refusal | refusal naming a city | invented answer | right > city name | mean gap |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {result['mean_right']:+.2f} | {result['mean_wrong_name']:+.2f} | {result['mean_invented']:+.2f} "
          f"| {result['right_over_wrong_name']:.1%} | {result['gap_right_minus_wrong_name']:+.2f} |")
    return result


if __name__ == "__main__":
    main()
