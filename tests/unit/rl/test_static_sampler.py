"""The static sampler's pure parts: batch buckets, the sampler choice, draws from given uniforms.
Sampling itself, against the eager loop on every family, is in tests/stage/test_families_stage.py."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from pipeline.core.errors import ConfigError
from pipeline.rl.rollout import draw
from pipeline.rl.static_sampler import buckets, sampler_kind, uniforms

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize("rows, want", [(1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12]),
                                        (64, [1, 2, 4, 8, 16, 32, 64]), (5, [1, 2, 4, 5])])
def test_buckets_are_powers_of_two_up_to_the_rows(rows, want):
    assert buckets(rows) == want


def test_draw_takes_the_given_uniform_through_the_cdf():
    """p = softmax([0, log 3]) = [0.25, 0.75]: u < 0.25 draws token 0, u >= 0.25 token 1, whatever
    the global generator holds; the log-probs are log 0.25 and log 0.75."""
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3)
    u = torch.tensor([[0.2], [0.25], [0.9]], dtype=torch.float64)
    token, logp, entropy = draw(logits, 1.0, u)
    assert token.tolist() == [0, 1, 1]
    torch.testing.assert_close(logp, torch.tensor([math.log(0.25), math.log(0.75), math.log(0.75)]))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy, torch.full((3,), h))
    # a temperature as a tensor (what a captured step reads) divides the same way: T = 2 -> [1/(1+sqrt3), ...]
    _, logp2, _ = draw(logits[:1], torch.tensor(2.0), u[:1])
    assert logp2.item() == pytest.approx(-math.log(1 + math.sqrt(3.0)), abs=1e-6)


def test_uniforms_are_one_float64_block_from_the_global_generator():
    torch.manual_seed(0)
    u = uniforms(3, 5, torch.device("cpu"))
    torch.manual_seed(0)
    assert u.shape == (3, 5) and u.dtype == torch.float64
    assert torch.equal(u, torch.rand(3, 5, dtype=torch.float64))


def test_the_sampler_choice_on_a_cpu():
    lm = LlamaForCausalLM(LlamaConfig(**TINY))
    assert sampler_kind("auto", lm) == "eager"  # fixed shapes only cost without graphs
    assert sampler_kind("eager", lm) == "eager" and sampler_kind("static", lm) == "static"
    with pytest.raises(ConfigError, match="ppo.sampler=graphs needs a CUDA device.*ppo.sampler=static"):
        sampler_kind("graphs", lm)


def test_a_sliding_window_model_samples_eagerly():
    lm = MistralForCausalLM(MistralConfig(**TINY, sliding_window=4))
    with pytest.raises(ConfigError, match="sliding-window attention layers; use ppo.sampler=eager"):
        sampler_kind("static", lm)
    assert sampler_kind("auto", lm) == "eager"
    assert sampler_kind("static", MistralForCausalLM(MistralConfig(**TINY, sliding_window=None))) == "static"


def test_a_failed_capture_names_the_samplers_that_need_none(monkeypatch):
    from types import SimpleNamespace

    from pipeline.rl.static_sampler import StaticSampler
    lm = LlamaForCausalLM(LlamaConfig(**TINY))
    static = StaticSampler(lm, SimpleNamespace(stop_ids=[1], pad_id=0), rows=2, prompt_tokens=4, max_new_tokens=4,
                           graphs=False)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, the model is on cpu"):
        StaticSampler(lm, SimpleNamespace(stop_ids=[1], pad_id=0), 2, 4, 4, graphs=True)
    static.graphs = True  # as on a CUDA device; the capture itself fails here
    monkeypatch.setattr(static, "_capture", lambda: (_ for _ in ()).throw(RuntimeError("operation not permitted")))
    with pytest.raises(RuntimeError, match="capturing the decode step failed .RuntimeError: operation not "
                                           "permitted.; ppo.sampler=static .* ppo.sampler=eager"):
        static.capture()
    assert not static._graphs


class ToyFormat:
    """The chat format's part a sampler uses: a prompt of n words is n ids (2..), 1 stops, 0 pads."""
    stop_ids, pad_id = [1], 0

    def prompt_ids(self, conversation):
        return [2 + i % 20 for i in range(len(conversation[-1]["content"].split()))]


def prompts(*words: int) -> list:
    return [[{"role": "user", "content": " ".join(["w"] * n)}] for n in words]


def test_the_trainers_sampler_keeps_one_static_sampler_until_a_chunk_outgrows_it():
    from pipeline.rl.static_sampler import RolloutSampler
    lm, other = LlamaForCausalLM(LlamaConfig(**TINY)).eval(), LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    sampler = RolloutSampler("static", ToyFormat())
    q_ids, q_mask, resp, mask, logprobs, entropy = sampler(lm, prompts(3, 5, 2), 1.0, 4)
    first = sampler.static
    assert (first.rows, first.P_max, first.T_max) == (3, 64, 4)  # the prompt width (5) rounded up to 64
    assert q_ids.shape == (3, 5) and resp.shape == mask.shape == logprobs.shape == (3, 4)
    sampler(lm, prompts(64, 1), 1.0, 4)  # fewer rows, a width of exactly 64: fits
    assert sampler.static is first
    sampler(lm, prompts(65), 1.0, 4)  # wider: a new one, as wide as the next multiple of 64
    assert sampler.static is not first and (sampler.static.rows, sampler.static.P_max) == (3, 128)
    second = sampler.static
    sampler(lm, prompts(1, 1, 1, 1), 1.0, 4)  # more rows: rebuilt, keeping the width
    assert (sampler.static.rows, sampler.static.P_max) == (4, 128)
    third = sampler.static
    sampler(lm, prompts(1), 1.0, 5)  # more new tokens
    assert sampler.static is not third and sampler.static.T_max == 5
    sampler(other, prompts(1), 1.0, 5)  # another model
    assert sampler.static.lm is other and second is not sampler.static
    eager = RolloutSampler("eager", ToyFormat())
    assert eager(lm, prompts(2), 1.0, 3)[2].shape == (1, 3) and eager.static is None


def test_fits_is_inclusive_of_each_limit():
    from types import SimpleNamespace

    from pipeline.rl.static_sampler import StaticSampler
    s = StaticSampler(LlamaForCausalLM(LlamaConfig(**TINY)), SimpleNamespace(stop_ids=[1], pad_id=0), 3, 8, 4,
                      graphs=False)
    assert s.fits(3, 8, 4) and s.fits(1, 1, 1)
    assert not s.fits(4, 8, 4) and not s.fits(3, 9, 4) and not s.fits(3, 8, 5)


def test_every_query_of_the_prompts_pass_attends_to_something():
    """Left pads see only themselves, real tokens the real tokens up to their own; no row of the
    (b, 1, P, L) mask is all masked (in fp16 such a row can turn NaN and spread through the keys)."""
    from pipeline.rl.static_sampler import StaticSampler
    torch.manual_seed(0)  # the model and the draws: token 0 is no stop, so one decode step runs
    lm = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    seen = []
    lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    static = StaticSampler(lm, ToyFormat(), rows=2, prompt_tokens=4, max_new_tokens=2, graphs=False)
    q_ids = torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]])
    q_mask = (q_ids != 0).long()
    static.decode(q_ids, q_mask, 1.0, 2)
    allowed = seen[0][:, 0] == 0  # (2, 4, 6): queries x cache columns
    want = torch.zeros(2, 4, 6, dtype=torch.bool)
    want[0, 0, 0] = want[0, 1, 1] = True  # the two pads, themselves only
    want[0, 2, 2] = True
    want[0, 3, 2:4] = True
    for i in range(4):
        want[1, i, :i + 1] = True
    assert torch.equal(allowed, want)
    step = seen[1][:, 0, 0] == 0  # the first decode step writes column 4: prompt (no pads) and itself
    assert torch.equal(step, torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool))
