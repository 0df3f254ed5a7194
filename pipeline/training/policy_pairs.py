"""On-policy preference pairs for DPO: the SFT policy's own samples, ranked by the run's RM.

DPO on a fixed preference set learns from responses the policy would rarely write (off-policy
data), and its implicit reward is only fitted where that data lies. Sampling ``k`` responses per
prompt from the SFT policy, scoring them with the reward model and keeping the best against the
worst puts the pairs where the policy's mass is, as PPO's rollouts are (Tajwar et al. 2024,
"Preference fine-tuning of LLMs should leverage suboptimal, on-policy data"; Llama 3's
post-training ranks its own samples with an RM before DPO, Dubey et al. 2024).

Shapes: ``N`` prompts, ``k`` samples per prompt, the ``N * k`` samples prompt-major.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pipeline.core.artifacts import Artifact
from pipeline.data.bad_rows import DataReport
from pipeline.data.layouts import load_validated, prompt_row
from pipeline.generation.decoding import DecodingConfig
from pipeline.generation.samples import Sample, sample_responses
from pipeline.models.policies import load_policy_artifact
from pipeline.models.reward import load_reward_model, score_conversations


def best_and_worst(scores: Sequence[float], usable: Sequence[bool]) -> Optional[tuple[int, int]]:
    """(chosen, rejected): the indices of the highest and the lowest score among the usable
    samples of one prompt; None when fewer than two are usable or the two scores tie (no
    preference to learn). Ties go to the earlier sample.

    e.g. scores [0.2, 1.5, -0.7, 0.9], usable [T, T, F, T] -> (1, 0): sample 2 scored lowest but
    did not stop, so it is neither chosen nor rejected.
    """
    idx = [i for i, ok in enumerate(usable) if ok]
    if len(idx) < 2:
        return None
    best = max(idx, key=lambda i: (scores[i], -i))
    worst = min(idx, key=lambda i: (scores[i], i))
    return None if scores[best] == scores[worst] else (best, worst)


def pick_pairs(prompts: list[list[dict]], samples: list[Sample], scores: Sequence[float], k: int) -> list[dict]:
    """One pair per prompt from its ``k`` samples (prompt-major, ``len(samples) == N * k``):
    ``{"prompt", "chosen", "rejected", "margin"}`` as conversations, the margin being the RM's
    score gap. A sample is usable when it stopped on its own with a clean answer (a truncated one
    would be trained with an end token it never wrote); identical texts give no pair."""
    if len(samples) != len(prompts) * k or len(scores) != len(samples):
        raise ValueError(f"{len(prompts)} prompts x k={k} need {len(prompts) * k} samples and scores, "
                         f"got {len(samples)} and {len(scores)}")
    pairs = []
    for n, prompt in enumerate(prompts):
        group, group_scores = samples[n * k:(n + 1) * k], scores[n * k:(n + 1) * k]
        picked = best_and_worst(group_scores, [s.well_formed for s in group])
        if picked is None or group[picked[0]].response == group[picked[1]].response:
            continue
        chosen, rejected = picked
        pairs.append({"prompt": prompt,
                      "chosen": [{"role": "assistant", "content": group[chosen].response}],
                      "rejected": [{"role": "assistant", "content": group[rejected].response}],
                      "margin": float(group_scores[chosen] - group_scores[rejected])})
    return pairs


def policy_pairs(cfg, sft: Artifact, rm: Artifact, data: Optional[DataReport] = None) -> tuple[list[dict], dict]:
    """Pairs from ``cfg.pairs.samples_per_prompt`` samples of the SFT policy on the first
    ``cfg.pairs.prompts`` of ``data.ppo_prompts``, ranked by ``rm``; and what the sampling gave
    (pair count, the share of prompts that gave one, the samples' stop rate, the mean margin)."""
    p = cfg.pairs
    rows = load_validated(list(cfg.data.ppo_prompts), cfg.data.hub_split, prompt_row, cfg.data.columns,
                          cfg.data.bad_rows, data)
    prompts = [r["messages"] for r in (rows if p.prompts is None else rows[:p.prompts])]
    repeated = [m for m in prompts for _ in range(p.samples_per_prompt)]
    dec = DecodingConfig(name="pairs", do_sample=True, temperature=p.temperature, top_k=0, top_p=1.0,
                         num_beams=1, max_new_tokens=p.max_new_tokens)
    model, fmt = load_policy_artifact(sft, cfg.model)
    with torch.no_grad():
        samples = sample_responses(model, fmt, repeated, dec, p.batch_size, cfg.seed)
    del model
    reward, _ = load_reward_model(rm, sft, cfg.model)
    scores = score_conversations(reward, fmt, repeated, [[{"role": "assistant", "content": s.response}]
                                                         for s in samples], p.batch_size).tolist()
    del reward
    pairs = pick_pairs(prompts, samples, scores, p.samples_per_prompt)
    stats = {"pairs/count": len(pairs), "pairs/prompts": len(prompts),
             "pairs/prompt_share": len(pairs) / max(1, len(prompts)),
             "pairs/eos_rate": sum(s.ended for s in samples) / max(1, len(samples)),
             "pairs/margin_mean": sum(x["margin"] for x in pairs) / max(1, len(pairs))}
    return pairs, stats
