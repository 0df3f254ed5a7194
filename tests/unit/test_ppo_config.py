"""PPO stage helpers: prompt batches across epochs and resumes, and config checks."""

import pytest

from pipeline.rl.ppo import check_config
from pipeline.runtime import ConfigError
from stages.ppo import prompt_batch
from tests.conftest import compose_config

pytestmark = pytest.mark.unit


def test_every_prompt_is_seen_once_per_epoch_even_across_batch_boundaries():
    prompts = [f"p{i}" for i in range(10)]
    # 4 prompts per update: update 2 straddles epochs 0 and 1 (prompts 8..11).
    seen = [p for u in range(5) for p in prompt_batch(prompts, u, 4, 0, 1, seed=3)]
    assert sorted(seen[:10]) == prompts and sorted(seen[10:20]) == prompts
    assert seen[:10] != seen[10:20]  # each epoch has its own order


def test_processes_split_a_global_batch_and_updates_are_pure():
    prompts = [f"p{i}" for i in range(12)]
    ranks = [prompt_batch(prompts, 1, 3, r, 2, seed=0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and not set(ranks[0]) & set(ranks[1])
    assert prompt_batch(prompts, 1, 3, 0, 2, seed=0) == ranks[0]  # a resumed run sees the same batch


@pytest.mark.parametrize("override, key", [
    ("ppo.minibatch_size=48", "ppo.minibatch_size=48 must divide"),
    ("ppo.generation_batch_size=0", "ppo.generation_batch_size must be positive"),
    ("checkpoint_every=0", "checkpoint_every must be positive"),
    ("ppo.kl.estimator=k2", "ppo.kl.estimator must be one of"),
    ("ppo.kl.controller=pid", "ppo.kl.controller must be one of"),
    ("ppo.value_init=random", "ppo.value_init must be one of"),
])
def test_unworkable_ppo_settings_are_refused_by_name(override, key):
    check_config(compose_config("ppo"))  # the shipped defaults pass
    with pytest.raises(ConfigError, match=key):
        check_config(compose_config("ppo", [override]))
