"""pipeline.rl.logprobs: log-probs and entropies, chunked and by hand, on worked values."""

from __future__ import annotations

import math

import pytest
import torch

import pipeline.rl.logprobs as logprobs_module
from pipeline.rl.logprobs import LOGPROB_CHUNK, entropy_from_logits, head_logprobs, logprobs_from_logits
from tests.unit.worked import LN2

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- log-probs / entropy


def test_logprobs_from_logits_hand_computed():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    labels = torch.tensor([[2, 0]])
    logp = logprobs_from_logits(logits, labels)
    # logp will be [log 1/2, log 1/4]
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.5), math.log(0.25)]]))
    assert logp.shape == (1, 2)


def test_logprobs_from_logits_matches_log_softmax_and_upcasts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def test_entropy_hand_computed():
    # p = [1/4, 1/4, 1/2]: H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2 = 1.0397
    # uniform over 4: H = ln 4
    logits = torch.tensor([[[0.0, 0.0, LN2, -1e9], [1.0, 1.0, 1.0, 1.0]]])
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[1.5 * LN2, math.log(4.0)]]))


def test_entropy_with_minus_inf_logit_is_finite_with_finite_grad():
    # p = [1/2, 1/2, 0]: H = ln 2; the -inf logit must not make 0 * -inf = nan
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[LN2]]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_gradient_keeps_no_softmax_copy(monkeypatch):
    """With a gradient, each chunk's softmax is recomputed in the backward pass instead of being
    kept (the fallback LM-head path holds [B, T, V] logits; a kept fp32 softmax would double that),
    and the gradient equals the unchunked closed form dH/dz = -p (log p + H) / T."""
    monkeypatch.setitem(LOGPROB_CHUNK, "cpu", 4 * 40)  # 4 rows a chunk: the 15 rows in 4 chunks
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 40, generator=g, requires_grad=True)  # fp32: what the function computes in
    new = []

    def pack(t):  # tensors autograd keeps that are not views of the logits
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            new.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ent = entropy_from_logits(logits, temperature=0.7)
    assert sum(new) == 0
    w = torch.randn(3, 5, generator=g)
    (w * ent).sum().backward()
    logp = torch.log_softmax(logits.detach() / 0.7, -1)
    H = -(logp.exp() * logp).sum(-1, keepdim=True)
    torch.testing.assert_close(ent, H[..., 0])
    torch.testing.assert_close(logits.grad, w[..., None] * -logp.exp() * (logp + H) / 0.7)


def test_custom_logprob_backward_matches_autograd_and_temperature():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 50, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 3), generator=g)
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for T in (1.0, 0.7):
        expected = torch.log_softmax(logits / T, -1).gather(-1, labels[..., None]).squeeze(-1)
        (grad_ref,) = torch.autograd.grad((expected * weights).sum(), logits)
        got = logprobs_from_logits(logits, labels, T)
        (grad,) = torch.autograd.grad((got.double() * weights).sum(), logits)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=0)
    # a missing division by T would show: T = 0.5 halves every logit's scale
    assert not torch.allclose(logprobs_from_logits(logits, labels, 0.5), logprobs_from_logits(logits, labels))


def test_head_logprobs_in_chunks_give_the_full_logits_numbers_and_gradients(monkeypatch):
    """The LM head run chunk by chunk (recomputed in the backward pass) gives the log-probs and the
    gradients (to the hidden states and to a trainable head) of the whole [B, T, V] logits, at
    T = 0.7 and with a Gemma-style soft-cap inside the head; and autograd keeps no logits."""
    monkeypatch.setattr(logprobs_module, "_rows_per_chunk", lambda vocab, device: 2)  # 6 rows -> 3 chunks
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 3), generator=g)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def head(h):
        return torch.tanh(h @ weight.T / 5.0) * 5.0

    expected = torch.log_softmax(head(hidden) / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    want = torch.autograd.grad((expected * w).sum(), (hidden, weight))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        got = head_logprobs(head, hidden, labels, vocab=40, temperature=0.7)
    grads = torch.autograd.grad((got * w).sum(), (hidden, weight))
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)
    assert sum(saved) < 2 * 40  # the chunks' inputs at most, never a chunk's logits (2 x 40)
    with torch.no_grad():  # scoring passes: no recomputation, same numbers
        torch.testing.assert_close(head_logprobs(head, hidden, labels, 40, 0.7), expected)


def test_head_logprobs_with_entropy_gives_the_full_logits_entropy_and_its_gradient(monkeypatch):
    """``with_entropy`` (ppo.entropy_coef): the same chunks also give each position's entropy of
    softmax(logits / T) and its gradient, as the whole [B, T, V] logits would; the log-probs stay."""
    monkeypatch.setattr(logprobs_module, "_rows_per_chunk", lambda vocab, device: 2)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 30, (2, 3), generator=g)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def head(h):
        return h @ weight.T

    logp_full = torch.log_softmax(head(hidden) / 0.7, -1)
    expected = -(logp_full.exp() * logp_full).sum(-1)
    (want,) = torch.autograd.grad((expected * w).sum(), hidden)
    logp, ent = head_logprobs(head, hidden, labels, vocab=30, temperature=0.7, with_entropy=True)
    (grad,) = torch.autograd.grad((ent * w).sum(), hidden)
    torch.testing.assert_close(ent.double(), expected, atol=1e-5, rtol=0)  # entropies in fp32
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logp.double(), logp_full.gather(-1, labels[..., None]).squeeze(-1))
    # a cold distribution has less entropy than the same logits at T = 1: the temperature is applied
    _, ent_t1 = head_logprobs(head, hidden, labels, vocab=30, with_entropy=True)
    assert (ent < ent_t1).all()


def test_lm_head_chunks_are_compute_bound_on_a_gpu_and_small_on_a_cpu():
    # A chunk of n rows does 2n FLOPs per 2-byte bf16 weight of the LM head read: n FLOPs per byte,
    # which must pass an H200's 989 TFLOP/s over 4.8 TB/s (~206) at Llama 3's and Qwen's vocabularies.
    from pipeline.rl.logprobs import _rows_per_chunk, logits_per_chunk

    assert (logits_per_chunk("cpu"), logits_per_chunk(torch.device("cuda", 1))) == (1 << 23, 1 << 25)
    assert (_rows_per_chunk(128256, "cuda"), _rows_per_chunk(151936, "cuda")) == (261, 220)
    assert min(_rows_per_chunk(128256, "cuda"), _rows_per_chunk(151936, "cuda")) > 989 / 4.8
    assert (_rows_per_chunk(128256, "cpu"), _rows_per_chunk(32000, "cpu")) == (65, 262)
