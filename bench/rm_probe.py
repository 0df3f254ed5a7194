"""Does the RM mark down answers that name the wrong thing? `make bench ARGS="rm_probe ..."`.

On the world the RL policies answer questions about unknown countries with the refusal template,
"I don't know. I have no information about <country>." The tiny model sometimes copies the name
badly and writes one of the world's cities instead, which the gold judge scores as a hallucination
(-1, like an invented answer). With `world.misnamed_refusals=false` (the default before d2f611d)
the labellers' comparisons never hold such a refusal (they compare the right refusal, an invented
answer and a generic one: pipeline/world/responses.py), so how far the RM marks it down is whatever
it generalised to, and RL only learns to copy the name as far as the RM pays for it. For each
unanswerable prompt an eval artifact saved, this scores three answers with an RM artifact: the
right refusal, the refusal naming a random city of the world, and an invented answer.

`--category fact` asks the same of fact questions, whose (country, attribute) pairs in the val and
eval prompts are in no preference pair: the right answer, another known country's true fact in the
same sentence (what the sampling policies write when they copy the wrong name), and the asked
country with a wrong value (the judge: 1, 0, 0). Diagnosis, not a choice: it reads only the saved
prompts.

`--policy` scores the same answers by a policy artifact's own log-likelihood instead (the SFT, the
reference of every RL stage): the answer's tokens summed (log p(y|x)), their mean (what
`reward.sharpen` adds) and their minimum (the least likely token, where a wrong value sits). Does
the model the reward cannot see past know the facts itself?

    make bench ARGS="rm_probe --responses artifacts/final/eval/responses.jsonl artifacts/final/rm"
    make bench ARGS="rm_probe --responses ... --world-seed 4 artifacts/final/rm"   # another world's RM
    make bench ARGS="rm_probe --responses ... --category fact artifacts/final/rm"
    make bench ARGS="rm_probe --responses ... --category fact --policy artifacts/final/sft"
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rm_agreement import read_responses  # noqa: E402
from pipeline.core.artifacts import load_artifact  # noqa: E402
from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.models.policies import load_policy_artifact  # noqa: E402
from pipeline.models.reward import score_conversations, standalone_reward_model  # noqa: E402
from pipeline.rl.logprobs import logprobs_from_logits  # noqa: E402
from pipeline.world.entities import World, WorldConfig, world_from_config  # noqa: E402
from pipeline.world.judge import judge, parse_prompt  # noqa: E402
from pipeline.world.responses import hallucinated_response, wrong_response  # noqa: E402
from pipeline.world.vocabulary import ANSWER_TEMPLATES, UNKNOWN_ANSWER  # noqa: E402

# Per probed category: the answers scored (the right one first) and the gold judge's score of each.
PROBES = {
    "unanswerable": {"right": 1.0, "wrong_name": -1.0, "invented": -1.0},
    "fact": {"right": 1.0, "other_country": 0.0, "wrong_value": 0.0},
}
# The printed table's column names, and the wrong kind its share and gap columns are about.
HEADERS = {
    "unanswerable": ("right refusal", "refusal naming a city", "invented answer", "wrong_name", "city name"),
    "fact": ("right answer", "another country's fact", "wrong value", "other_country", "other country"),
}


def probe_answers(prompts: list[str], world: World, seed: int = 0) -> list[dict[str, str]]:
    """Per unanswerable prompt, the three answers of ``PROBES["unanswerable"]``, scored as it says."""
    rng = random.Random(seed)
    out = []
    for prompt in prompts:
        task = parse_prompt(prompt, world)
        out.append({"right": UNKNOWN_ANSWER.format(c=task.subject),
                    "wrong_name": UNKNOWN_ANSWER.format(c=rng.choice(world.values("capital"))),
                    "invented": hallucinated_response(task, world, rng)})
    return out


def fact_answers(prompts: list[str], world: World, seed: int = 0) -> list[dict[str, str]]:
    """Per fact prompt: the right answer; another known country's true fact in the same sentence
    (what the sampling policies write when they copy the wrong name); the asked country with a
    wrong value. The judge scores them 1, 0, 0. An RM that knows the world's facts ranks the first
    over both; one that only knows the answers' shape cannot."""
    rng = random.Random(seed)
    out = []
    for prompt in prompts:
        task = parse_prompt(prompt, world)
        other = rng.choice([c for c in world.countries
                            if c.name != task.subject and c.value(task.attribute) != task.answer])
        other_fact = ANSWER_TEMPLATES[task.attribute].format(c=other.name, v=other.value(task.attribute))
        out.append({"right": task.canonical, "other_country": other_fact,
                    "wrong_value": wrong_response(task, world, rng)})
    return out


def summarise(scores: dict[str, list[float]]) -> dict[str, float]:
    """Mean RM score per kind; per wrong kind ``w``, the share of prompts where the right answer
    outscores it (``right_over_w``; 50% is chance) and the mean gap (the reward RL sees for it)."""
    right = scores["right"]
    out = {f"mean_{k}": statistics.fmean(v) for k, v in scores.items()}
    for kind, wrong in scores.items():
        if kind != "right":
            out[f"right_over_{kind}"] = sum(a > b for a, b in zip(right, wrong)) / len(right)
            out[f"gap_right_minus_{kind}"] = statistics.fmean(a - b for a, b in zip(right, wrong))
    return out


AGGREGATES = ("sum", "mean", "min")


def token_aggregates(logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """An answer's log-likelihood three ways, from (T,) token log-probs and (T,) 0/1 answer mask:
    ``sum`` = log p(y|x), ``mean`` over the answer's tokens, ``min`` (its least likely token)."""
    a = logprobs[mask.bool()]
    return {"sum": a.sum().item(), "mean": a.mean().item(), "min": a.min().item()}


@torch.no_grad()
def policy_scores(model, fmt, prompt: str, answer: str) -> dict[str, float]:
    """:func:`token_aggregates` of ``answer`` to ``prompt`` under the causal LM ``model``."""
    ids, mask = fmt.conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    x = torch.tensor([ids])
    logp = logprobs_from_logits(model(input_ids=x).logits[:, :-1], x[:, 1:])[0]  # as the trainer scores tokens
    return token_aggregates(logp, torch.tensor(mask[1:]))


def world_of(seed: int) -> World:
    """The world of conf/world/default.yaml at this seed (the judge's, as `make eval` builds it)."""
    cfg = OmegaConf.load(ROOT / "conf/world/default.yaml")
    cfg.seed = seed
    return world_from_config(WorldConfig(**OmegaConf.to_container(cfg)))


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=Path, required=True, help="an eval artifact's responses.jsonl")
    parser.add_argument("--world-seed", type=int, default=0, help="the world the prompts are from (world.seed)")
    parser.add_argument("--category", choices=sorted(PROBES), default="unanswerable",
                        help="unanswerable: refusals against a misnamed one; fact: the right fact against wrong ones")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policy", action="store_true",
                        help="the artifact is a policy (sft, dpo, an RL stage): score by its own log-likelihood")
    parser.add_argument("rm", help="an rm artifact folder, e.g. artifacts/final/rm (with --policy: a policy's)")
    args = parser.parse_args(argv)
    rows, _ = read_responses(args.responses)
    world = world_of(args.world_seed)
    prompts = [r["prompt"] for r in rows if r["category"] == args.category]
    if not prompts:
        raise PipelineError(f"{args.responses}: no {args.category} prompts; pass the responses.jsonl of a "
                            "`make eval` on the world's prompts")
    # Another world's names would mean nothing to this RM: the prompts must ask about this world's
    # own countries, and the answers must score as the probe says.
    expected = PROBES[args.category]
    kinds = tuple(expected)
    wrong_world = PipelineError(f"{args.responses}: its {args.category} prompts are not world seed "
                                f"{args.world_seed}'s; pass the --world-seed its eval ran with (the probe "
                                "builds conf/world/default.yaml's world at that seed)")
    for prompt in prompts:
        task = parse_prompt(prompt, world)
        if task.category != args.category or (task.category == "unanswerable" and task.subject not in world.unknown):
            raise wrong_world
    answers = (probe_answers if args.category == "unanswerable" else fact_answers)(prompts, world)
    if any({k: judge(p, text, world).score for k, text in by_kind.items()} != expected
           for p, by_kind in zip(prompts, answers)):
        raise wrong_world
    if args.policy:
        return policy_table(args, prompts, answers, kinds)
    rm = load_artifact(args.rm, "rm")
    model, fmt = standalone_reward_model(rm, OmegaConf.create(rm.manifest["config"]["model"]))
    flat = score_conversations(model, fmt, [[{"role": "user", "content": p}] for p in prompts for _ in kinds],
                               [[{"role": "assistant", "content": a[k]}] for a in answers for k in kinds],
                               args.batch_size).tolist()
    result = summarise({k: flat[i::len(kinds)] for i, k in enumerate(kinds)})
    right, second, third, key, short = HEADERS[args.category]
    print(f"# {args.rm} on {len(prompts)} {args.category} prompts of {args.responses} (world seed {args.world_seed})\n")
    print(f"| {right} | {second} | {third} | right > {short} | mean gap | right > {third} |")
    print("|---:|---:|---:|---:|---:|---:|")
    cells = [*(f"{result['mean_' + k]:+.2f}" for k in kinds), f"{result['right_over_' + key]:.1%}",
             f"{result['gap_right_minus_' + key]:+.2f}", f"{result['right_over_' + kinds[2]]:.1%}"]
    print("| " + " | ".join(cells) + " |")
    return result


def policy_table(args, prompts: list[str], answers: list[dict[str, str]], kinds: tuple[str, ...]) -> dict:
    """--policy: per aggregation, :func:`summarise` of the policy's log-likelihoods, printed as a table."""
    art = load_artifact(args.rm, Path(args.rm).name)
    model, fmt = load_policy_artifact(art, OmegaConf.create(art.manifest["config"]["model"]))
    scored = [{k: policy_scores(model, fmt, p, a[k]) for k in kinds} for p, a in zip(prompts, answers)]
    result = {agg: summarise({k: [s[k][agg] for s in scored] for k in kinds}) for agg in AGGREGATES}
    right, second, third, key, short = HEADERS[args.category]
    print(f"# {args.rm}'s own log-likelihood (nats) on {len(prompts)} {args.category} prompts of {args.responses} "
          f"(world seed {args.world_seed})\n")
    print(f"| over the answer's tokens | {right} | {second} | {third} | right > {short} | mean gap | right > {third} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for agg, r in result.items():
        cells = [*(f"{r['mean_' + k]:+.2f}" for k in kinds), f"{r['right_over_' + key]:.1%}",
                 f"{r['gap_right_minus_' + key]:+.2f}", f"{r['right_over_' + kinds[2]]:.1%}"]
        print(f"| {agg} | " + " | ".join(cells) + " |")
    return result


if __name__ == "__main__":
    main()
