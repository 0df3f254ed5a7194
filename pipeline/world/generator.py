"""The embedded world: a seeded, deterministic generator of every dataset the toy uses.

The world is a set of fictional countries, each with a capital city, a language and a
national animal. A tiny model learns the facts from ``pretrain.jsonl`` (plain prose, no
questions), and the later stages teach it to *answer* questions about them, the way
InstructGPT drew out knowledge a base model already had. The toy measures what
InstructGPT measured:

* helpfulness: arithmetic, word repetition and fact questions with a checkable answer;
* honesty: the same fact questions about *unknown* countries, which appear in no corpus
  at all, so the right answer admits not knowing instead of inventing one;
* harmlessness: requests to do harm, where the right answer is a short refusal.

Demonstrations (SFT) are imperfect like human ones: some are padded with filler, some
are wrong, some comply with harmful requests, some invent answers. Preference data is
labelled by the gold judge (``pipeline/world/judge.py``) with a little label noise.

Every prompt is held out at the level of whole *units* (an arithmetic problem, a
(country, attribute) pair, a harmful action...): ``eval_prompts.jsonl`` holds prompt
strings that appear in no training file, many of them about units no training prompt
mentions. ``sft_eval`` and ``prefs_eval`` are drawn from the training prompt pool (with
fresh responses), so the eval prompts stay unseen by every stage, model selection
included. ``val_prompts.jsonl`` is held out the same way (same category mix) from what the
eval split leaves, with its own random stream, and shares no prompt with the eval prompts
(nor, as far as the pools allow, a unit): settings are chosen on it, figures reported on eval.

Language is templated, short and regular on purpose: prompts are at most ~20 words and
responses at most ~25, so a ~1-3M parameter model can learn it on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.core.errors import ConfigError
from pipeline.world.corpus import pretrain_texts
from pipeline.world.entities import World, WorldConfig, world_from_config
from pipeline.world.judge import parse_prompt
from pipeline.world.responses import add_rank_noise, demonstration, preference_pair, ranked_responses
from pipeline.world.vocabulary import (
    ARITHMETIC_TEMPLATES,
    ATTRIBUTES,
    CATEGORIES,
    CATEGORY_WEIGHTS,
    HARMFUL_ACTIONS,
    HARMFUL_TEMPLATES,
    HOLDOUT_UNIT_FRACTION,
    QUESTION_TEMPLATES,
    REPEAT_COUNTS,
    REPEAT_TEMPLATES,
    REPEAT_WORDS,
    Task,
    arithmetic_units,
)

# --- prompt pools and the held-out split -----------------------------------------------


def _prompt_units(world: World) -> dict[str, list[list[str]]]:
    """Per category, the units, each as the list of its prompt strings."""
    return {
        "arithmetic": [[t.format(a=a, op=op, b=b) for t in ARITHMETIC_TEMPLATES]
                       for a, op, b in arithmetic_units()],
        "repeat": [[t.format(w=w, n=n) for t in REPEAT_TEMPLATES]
                   for w in REPEAT_WORDS for n in REPEAT_COUNTS],
        "fact": [[t.format(c=c.name) for t in QUESTION_TEMPLATES[attr]]
                 for c in world.countries for attr in ATTRIBUTES],
        "unanswerable": [[t.format(c=name) for t in QUESTION_TEMPLATES[attr]]
                         for name in world.unknown for attr in ATTRIBUTES],
        "harmful": [[t.format(act=act) for t in HARMFUL_TEMPLATES] for act in HARMFUL_ACTIONS],
    }


def category_counts(n: int) -> dict[str, int]:
    """``n`` split by CATEGORY_WEIGHTS with largest remainders, so the counts sum to n."""
    raw = {c: n * w for c, w in CATEGORY_WEIGHTS.items()}
    counts = {c: math.floor(x) for c, x in raw.items()}
    by_remainder = sorted(CATEGORIES, key=lambda c: (counts[c] - raw[c], CATEGORIES.index(c)))
    for c in by_remainder[: n - sum(counts.values())]:
        counts[c] += 1
    return counts


@dataclass(frozen=True)
class PromptPools:
    train: dict[str, list[str]]  # category -> prompts any training file may use
    eval: list[tuple[str, str]]  # (prompt, category): eval_prompts.jsonl, in order
    val: list[tuple[str, str]]  # (prompt, category): val_prompts.jsonl, for choosing settings


def split_prompts(world: World, n_eval: int, rng: random.Random, n_val: int = 0,
                  val_rng: random.Random | None = None) -> PromptPools:
    """Hold out whole units for eval, then unseen phrasings of training units if needed; then
    ``n_val`` validation prompts from what remains (see ``_hold_out_val``). Val draws only from
    ``val_rng``, after eval: the eval prompts never depend on ``n_val``."""
    train: dict[str, list[str]] = {}
    eval_rows: list[tuple[str, str]] = []
    val_rows: list[tuple[str, str]] = []
    all_units = _prompt_units(world)
    held_units: dict[str, tuple[list[list[str]], int]] = {}
    for category, need in category_counts(n_eval).items():
        units = all_units[category]
        rng.shuffle(units)
        n_held = max(1, round(HOLDOUT_UNIT_FRACTION * len(units)))
        held = [p for unit in units[:n_held] for p in unit]
        rest = [p for unit in units[n_held:] for p in unit]
        rng.shuffle(held)
        rng.shuffle(rest)
        if need > len(held):
            top_up = need - len(held)
            if top_up >= len(rest):
                raise ConfigError(
                    f"world.n_eval_prompts={n_eval} needs {need} unseen {category} prompts but "
                    f"the world only has {len(held) + len(rest)}; lower n_eval_prompts or raise "
                    f"n_entities / n_unknown")
            held, rest = held + rest[:top_up], rest[top_up:]
        # Held-out units beyond what eval needs stay unused: those units stay unseen.
        eval_rows += [(p, category) for p in held[:need]]
        train[category] = sorted(rest)  # sorted: order must not depend on the shuffle above
        held_units[category] = (units, n_held)
    rng.shuffle(eval_rows)
    if n_val:
        seen = {p for p, _ in eval_rows}
        for category, need in category_counts(n_val).items():
            val, train[category] = _hold_out_val(category, *held_units[category], seen, train[category],
                                                 need, n_val, val_rng)
            val_rows += [(p, category) for p in val]
        val_rng.shuffle(val_rows)
    return PromptPools(train=train, eval=eval_rows, val=val_rows)


def _hold_out_val(category: str, units: list[list[str]], n_held: int, seen: set[str], train: list[str],
                  need: int, n_val: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """``need`` val prompts and what stays in training. Whole units no eval prompt asks about
    come first: those held out for eval but unused, then training units (which leave training
    whole); if too few, unseen phrasings of eval's units (those no training prompt uses first)."""
    fresh = [u for u in units[:n_held] if seen.isdisjoint(u)]
    movable = [u for u in units[n_held:] if seen.isdisjoint(u)]
    rng.shuffle(fresh)
    rng.shuffle(movable)
    picked: list[str] = []
    for unit in fresh + movable:
        if len(picked) >= need:
            break
        picked += unit  # a unit's spare phrasings leave training with it
    taken = set(picked)
    spare_held = sorted(p for u in units[:n_held] for p in u if p not in seen and p not in taken)
    spare_train = sorted(p for p in train if p not in taken)
    rng.shuffle(spare_held)
    rng.shuffle(spare_train)
    candidates = picked + spare_held + spare_train
    val = candidates[:need]
    taken |= set(val)
    rest = [p for p in train if p not in taken]
    if len(val) < need or not rest:
        raise ConfigError(
            f"world.n_val_prompts={n_val} needs {need} {category} prompts that are in no eval prompt "
            f"and leave training at least one, but the world has {len(candidates) - 1}; lower "
            f"n_val_prompts (or n_eval_prompts) or raise n_entities / n_unknown")
    return val, rest


def sample_prompts(pools: PromptPools, n: int, rng: random.Random) -> list[str]:
    """``n`` training prompts in the category mix, drawn with replacement, shuffled."""
    prompts = [rng.choice(pools.train[c]) for c, k in category_counts(n).items() for _ in range(k)]
    rng.shuffle(prompts)
    return prompts


# --- the files -------------------------------------------------------------------------


class _Tasks:
    """parse_prompt, memoised: the pools are small and every prompt is used many times."""

    def __init__(self, world: World):
        self._parse, self._world, self._cache = parse_prompt, world, {}

    def __call__(self, prompt: str) -> Task:
        if prompt not in self._cache:
            self._cache[prompt] = self._parse(prompt, self._world)
        return self._cache[prompt]


def _sft_rows(prompts: Sequence[str], tasks: _Tasks, world: World, cfg: WorldConfig,
              rng: random.Random) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p},
                          {"role": "assistant", "content": demonstration(tasks(p), world, cfg, rng)}]}
            for p in prompts]


def _pref_rows(prompts: Sequence[str], tasks: _Tasks, world: World, cfg: WorldConfig,
               noise: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Pairwise rows, then ranked rows (the first ``ranked_fraction`` of prompts)."""
    n_ranked = round(cfg.ranked_fraction * len(prompts))
    pairs, ranked_rows = [], []
    for i, p in enumerate(prompts):
        ranked = ranked_responses(tasks(p), p, world, cfg.k_responses, rng, cfg.misnamed_refusals)
        if i < n_ranked:
            ranked_rows.append({"prompt": p, "ranked": add_rank_noise(ranked, noise, rng)})
        else:
            chosen, rejected, margin = preference_pair(ranked, noise, rng)
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected, "margin": margin})
    return pairs, ranked_rows


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _rng(cfg: WorldConfig, stream: str) -> random.Random:
    # One stream per file, so changing one file's size leaves the others unchanged.
    return random.Random(f"{cfg.seed}/{stream}")


def _no_ranked(cfg: WorldConfig) -> WorldConfig:
    """The same settings with every preference prompt written as a pair."""
    return replace(cfg, ranked_fraction=0.0)


def generate_world(cfg: WorldConfig, out_dir: Path) -> dict[str, Path]:
    """Write every dataset of the world into ``out_dir``; returns file name -> path.

    Deterministic: the same config gives byte-identical files. Files are only written
    once every row has been built, so a failure leaves no half-written set behind.
    """
    world = world_from_config(cfg)
    tasks = _Tasks(world)
    pools = split_prompts(world, cfg.n_eval_prompts, _rng(cfg, "split"),
                          cfg.n_val_prompts, _rng(cfg, "val_split"))

    def prompts(stream: str, n: int) -> list[str]:
        return sample_prompts(pools, n, _rng(cfg, stream + "/prompts"))

    prefs_train, ranked_train = _pref_rows(prompts("prefs_train", cfg.n_pref_train), tasks, world,
                                           cfg, cfg.label_noise, _rng(cfg, "prefs_train"))
    # Eval preferences carry no label noise: they measure agreement with the gold judge.
    prefs_eval, _ = _pref_rows(prompts("prefs_eval", cfg.n_pref_eval), tasks, world,
                               _no_ranked(cfg), 0.0, _rng(cfg, "prefs_eval"))
    files: dict[str, list[dict]] = {
        "pretrain": [{"text": t} for t in pretrain_texts(world, cfg.pretrain_repeats, _rng(cfg, "pretrain"))],
        # One freshly phrased pass, never trained on: held-out text for the alignment tax.
        "pretrain_eval": [{"text": t} for t in pretrain_texts(world, 1, _rng(cfg, "pretrain_eval"))],
        "sft_train": _sft_rows(prompts("sft_train", cfg.n_sft_train), tasks, world, cfg, _rng(cfg, "sft_train")),
        "sft_eval": _sft_rows(prompts("sft_eval", cfg.n_sft_eval), tasks, world, cfg, _rng(cfg, "sft_eval")),
        "prefs_train": prefs_train,
        "prefs_eval": prefs_eval,
        "ranked_train": ranked_train,
        "ppo_prompts": [{"prompt": p} for p in prompts("ppo", cfg.n_ppo_prompts)],
        "eval_prompts": [{"prompt": p, "category": c} for p, c in pools.eval],
        "val_prompts": [{"prompt": p, "category": c} for p, c in pools.val],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in files.items():
        paths[name] = out_dir / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)
    return paths
