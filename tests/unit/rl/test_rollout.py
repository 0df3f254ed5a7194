"""pipeline.rl.rollout: the sampler's distribution, packing, length grouping."""

import math

import pytest
import torch

from pipeline.rl.logprobs import logprobs_from_logits
from pipeline.rl.rollout import (Rollout, by_length, concat, cumulative, draw, first_fit, pack,
                                 position_ids_from_mask, row_width)

pytestmark = pytest.mark.unit


def test_draw_samples_from_softmax_over_t_and_records_it():
    # logits [0, ln 2, ln 4, -inf] at T = 0.5: softmax(logits / T) = [1, 4, 16, 0] / 21
    logits = torch.tensor([[0.0, math.log(2), math.log(4), -math.inf]]).repeat(20000, 1)
    torch.manual_seed(0)
    token, logp, entropy = draw(logits, temperature=0.5)
    freq = torch.bincount(token, minlength=4).float() / 20000
    expected = torch.tensor([1.0, 4.0, 16.0, 0.0]) / 21
    # binomial std at n = 20000 is at most 0.0036: 4 std; the -inf entry is never drawn
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert freq[3] == 0
    torch.testing.assert_close(logp, expected.log()[token])
    h = -(expected[:3] * expected[:3].log()).sum()
    torch.testing.assert_close(entropy, h.expand(20000))


def test_draw_is_greedy_on_a_certain_row_and_keeps_rows_apart():
    logits = torch.tensor([[0.0, 0.0, 30.0], [30.0, 0.0, 0.0]])
    token, logp, _ = draw(logits, temperature=1.0)
    assert token.tolist() == [2, 0]
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[[0, 1], [2, 0]])


def test_pack_fills_rows_first_fit_and_points_at_each_prefix():
    pad = 0
    q = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 3]])  # prompts of 2, 4 and 1 tokens
    r = torch.tensor([[11, 12, 13], [14, 0, 0], [15, 16, 0]])  # responses of 3, 1 and 2 tokens
    r_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    p = pack(q, (q != pad).long(), r, r_mask, pad)
    # lengths 5, 5 and 3, rows twice the longest (10): side by side would be 3 rows of 4 + 3 = 7
    # columns; first fit in decreasing length puts seqs 0 and 1 in row 0, seq 2 + 7 pads in row 1
    assert p.ids.tolist() == [[5, 6, 11, 12, 13, 7, 8, 9, 10, 14], [3, 15, 16] + [0] * 7]
    assert p.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [0, 1, 2] + [0] * 7]
    # flat index (row * 10 + column) of the token before each response token, clamped to the
    # sequence's last token past its end; and each sequence's last token
    assert p.prefix.tolist() == [[1, 2, 3], [8, 9, 9], [10, 11, 12]]
    assert p.last.tolist() == [4, 9, 12]


def test_pack_puts_short_sequences_side_by_side_in_one_row():
    q = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 6]])
    r = torch.tensor([[7, 8, 9, 10], [11, 0, 0, 0], [12, 0, 0, 0]])
    r_mask = (r != 0).long()
    p = pack(q, (q != 0).long(), r, r_mask, 0)  # lengths 6, 4 and 2 fill one row of 12
    assert p.ids.tolist() == [[1, 2, 7, 8, 9, 10, 3, 4, 5, 11, 6, 12]]
    assert p.positions.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1]]
    assert p.prefix[1:, 0].tolist() == [8, 10] and p.last.tolist() == [5, 9, 11]
    one = pack(q, (q != 0).long(), r, r_mask, 0, several_per_row=False)  # rows as wide as the longest
    assert one.ids.tolist() == [[1, 2, 7, 8, 9, 10], [3, 4, 5, 11, 0, 0], [6, 12, 0, 0, 0, 0]]


def test_row_width_weighs_padding_against_attention():
    # lengths 5, 5, 3; widths tried: 5, 7, 8, 9, 10, 13, 15 (1 to 3 x the longest), rows first fit:
    #   W 5: 3 rows = 15 slots, W 8: [5 3] [5] = 16, W 10: [5 5] [3] = 20, W 13: [5 5 3] = 13
    # cost rows * W * (1 + c W): with free attention (c = 0) one row of 13 is cheapest; at
    # c = 0.1, W 5 costs 15 * 1.5 = 22.5 against 13 * 2.3 = 29.9 and 16 * 1.8 = 28.8
    assert row_width([5, 5, 3], 0.0) == 13
    assert row_width([5, 5, 3], 0.1) == 5
    # 32 sequences of 36..53 tokens, 1420 in all (like the bench's model (b)): rows twice the
    # longest (106) hold two each, 16 rows at 84% real tokens; 1.75 x (93) still holds two of
    # them (36 + 53 ... 45 + 46 <= 93), 16 rows at 95%: cheapest at a 7B-like attention cost
    lengths = [36 + (7 * i) % 18 for i in range(32)]
    assert row_width(lengths, 1 / 3000) == 93
    assert max(r for r, _ in first_fit(lengths, 93)) + 1 == 16 == max(r for r, _ in first_fit(lengths, 106)) + 1


def test_pack_takes_the_row_width_for_the_model():
    q = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 6]])
    r = torch.tensor([[7, 8], [11, 12], [13, 0]])
    r_mask = (r != 0).long()  # lengths 4, 5, 2
    p = pack(q, (q != 0).long(), r, r_mask, 0, attention_cost=0.0)  # widths 5..15: all in one row of 13
    assert p.ids.tolist() == [[3, 4, 5, 11, 12, 1, 2, 7, 8, 6, 13, 0, 0]]
    assert pack(q, (q != 0).long(), r, r_mask, 0, attention_cost=1.0).ids.shape == (3, 5)  # attention dear


def test_by_length_groups_short_rows_together():
    q = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    r = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    chunks = by_length(q, r, 2)  # lengths 6, 2, 6, 3
    assert [c.tolist() for c in chunks] == [[1, 3], [0, 2]]


def _qwen_size_row() -> torch.Tensor:
    """One row of 152,064 logits (Qwen2's vocabulary): one token of p ~ 0.5, a few hundred of
    middling mass, and 150,000 tail tokens of p = 2.5e-8 each (0.375% in all) that come after
    them in vocabulary order."""
    logits = torch.full((152_064,), math.log(2.5e-8))
    logits[0] = math.log(0.5)
    logits[1:2064] = torch.linspace(-6.0, -9.0, 2063)
    return logits - torch.logsumexp(logits.double(), 0).float()


def test_sampler_draws_from_the_exact_softmax_at_a_152k_vocabulary():
    # The distribution the inverse CDF draws from is the cdf's increments. A fp32 running sum past
    # 0.5 rounds away every increment under 3e-8: 1.6e-3 of total variation, moved off the tail.
    x = _qwen_size_row()[None]
    cdf = cumulative(x).double()[0]
    implied = torch.diff(cdf, prepend=cdf.new_zeros(1)) / cdf[-1]
    exact = torch.softmax(x[0].double(), -1)
    assert 0.5 * (implied - exact).abs().sum() < 1e-9  # total variation
    tail = exact < 1e-7
    assert (implied[tail] > 0).all()
    torch.testing.assert_close(implied[tail], exact[tail], rtol=1e-6, atol=0)


def test_sampler_logprobs_are_the_trainers_at_a_152k_vocabulary():
    # torch's fp32 log_softmax drops this row's tail from its sum: every log-prob came out 2.9e-4
    # nats high, a gap between the sampler and the trainer that no policy change explains.
    x = _qwen_size_row()[None].expand(64, -1)
    torch.manual_seed(0)
    token, logp, _ = draw(x, temperature=1.0)
    exact = torch.log_softmax(x.double(), -1).gather(-1, token[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), exact, atol=2e-6, rtol=0)
    torch.testing.assert_close(logp, logprobs_from_logits(x[:, None], token[:, None])[:, 0], atol=1e-6, rtol=0)


def test_draw_reaches_the_tail_of_a_152k_vocabulary():
    # End to end through draw: 4000 draws at 0.2% tail mass give about 8 tail tokens
    # (Poisson; P(< 2) = 3e-3); a sampler that cannot reach the tail draws none.
    logits = _qwen_size_row()[None].expand(100, -1)
    torch.manual_seed(0)
    tail = sum(int((draw(logits, temperature=1.0)[0] >= 2064).sum()) for _ in range(40))
    assert 2 <= tail <= 25, tail


def test_draw_never_picks_a_token_of_probability_zero_at_the_interval_edges(monkeypatch):
    # The uniform can be exactly 0, and u * total can land exactly on a running sum: a -inf logit is
    # an empty interval [cdf[i-1], cdf[i]) there, which searchsorted(right=True) never returns.
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 0.0, -math.inf]])
    for u in (0.0, 0.5):  # at 0: token 0's empty interval; at 0.5: exactly the end of token 1's
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u, dtype=kw.get("dtype")))
        token, logp, _ = draw(logits, temperature=1.0)
        assert token.item() == (1 if u == 0.0 else 3) and logp.item() == pytest.approx(math.log(0.5))


def _rollout() -> Rollout:
    """Two rows: prompts of 2 and 1 tokens left-padded to 4, responses of 3 and 1 tokens right-padded to 4."""
    q = torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7]])
    r_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    per_token = torch.arange(8.0).view(2, 4)
    return Rollout(query_ids=q, query_mask=(q != 0).long(), response_ids=torch.tensor([[8, 9, 2, 0], [3, 0, 0, 0]]),
                   response_mask=r_mask, logprobs=per_token, ref_logprobs=per_token + 10, entropy=per_token * 0,
                   scores=torch.tensor([1.0, 2.0]), rm_scores=torch.tensor([0.5, 0.25]), advantages=per_token - 1)


def test_trimmed_drops_only_the_columns_that_are_padding_in_every_row():
    t = _rollout().trimmed()
    assert t.query_ids.tolist() == [[5, 6], [0, 7]]  # two leading pad columns go, the ragged one stays
    assert t.query_mask.tolist() == [[1, 1], [0, 1]]
    assert t.response_ids.tolist() == [[8, 9, 2], [3, 0, 0]]  # through the longest response, inclusive
    assert t.logprobs.tolist() == [[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]]
    assert t.ref_logprobs.tolist() == [[10.0, 11.0, 12.0], [14.0, 15.0, 16.0]]
    assert t.advantages.tolist() == [[-1.0, 0.0, 1.0], [3.0, 4.0, 5.0]]
    assert t.scores.tolist() == [1.0, 2.0] and t.values is None and t.kl is None  # per-sequence and absent fields stay


def test_select_takes_rows_of_every_field_and_keeps_absent_ones_absent():
    s = _rollout().select(torch.tensor([1]))
    assert s.query_ids.tolist() == [[0, 0, 0, 7]] and s.scores.tolist() == [2.0] and s.rm_scores.tolist() == [0.25]
    assert s.values is None and s.returns is None and s.advantages.tolist() == [[3.0, 4.0, 5.0, 6.0]]


def test_gather_reads_per_token_outputs_of_any_trailing_shape_at_flat_indices():
    p = pack(torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), torch.tensor([[6]]), torch.tensor([[1]]), 0)
    hidden = torch.arange(p.ids.numel() * 3.0).view(*p.ids.shape, 3)  # (R, W, H)
    assert p.gather(hidden, p.last).tolist() == [[6.0, 7.0, 8.0]]  # the response token, column 2 of row 0
    assert p.gather(hidden[..., 0], p.prefix).tolist() == [[3.0]]  # the token before it, column 1


def test_row_width_counts_every_row_worked():
    # lengths 10, 6, 6 at no attention cost: rows of 10 take 3 rows (30 columns), of 13 two (26), of 25
    # one (25): 25. Counting one row too many would pick 13 (3 x 13 = 39 against 2 x 25 = 50).
    assert row_width([10, 6, 6], attention_cost=0.0) == 25
    # With attention: a token costs 1 + 0.02 W. Rows of 12 (3 rows, 3 x 12 x 1.24 = 44.6) beat one row of
    # 30 (30 x 1.6 = 48); a linear cost of 2 per token instead of 1 would tip it to 30.
    assert row_width([5, 4, 12, 7], attention_cost=0.02) == 12


def test_positions_skip_the_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_concat_pads_prompts_left_and_responses_right_to_the_widest_chunk():
    a = _rollout()
    b = _rollout().select(torch.tensor([1])).trimmed()  # prompt width 1, response width 1
    c = concat([a, b], pad_id=99)
    assert c.query_ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7], [99, 99, 99, 7]]
    assert c.query_mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert c.response_ids.tolist()[2] == [3, 99, 99, 99] and c.response_mask.tolist()[2] == [1.0, 0.0, 0.0, 0.0]
    assert c.logprobs.tolist()[2] == [4.0, 0.0, 0.0, 0.0] and c.advantages.tolist()[2] == [3.0, 0.0, 0.0, 0.0]
    assert c.scores.tolist() == [1.0, 2.0, 2.0] and c.values is None


def test_cumulative_leaves_a_float64_input_as_it_was():
    x = torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    cdf = cumulative(x)
    assert x.tolist() == [[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]]
    e1, e2 = math.exp(-1), math.exp(-2)  # each row shifted by its own max
    torch.testing.assert_close(cdf, torch.tensor([[e2, e2 + e1, e2 + e1 + 1], [1.0, 2.0, 3.0]], dtype=torch.float64))
