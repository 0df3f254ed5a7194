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
