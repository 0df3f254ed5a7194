"""The gold judge as an RL reward source (``reward.sources.gold`` in ``conf/ppo.yaml``)."""

from __future__ import annotations

from pipeline.world.entities import build_world
from pipeline.world.judge import judge


class GoldJudgeReward:
    """The world's gold judge as a reward (an oracle: off by default, useful for ablations)."""

    def __init__(self, seed: int, n_entities: int, n_unknown: int):
        self.world = build_world(seed, n_entities, n_unknown)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [judge(p, r, self.world).score for p, r in zip(prompts, responses)]
