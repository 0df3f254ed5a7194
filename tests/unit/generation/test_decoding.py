"""pipeline.generation.decoding on a tiny random Llama and a word-level tokenizer built in memory.

The model is untrained (std 0.02 init, so logits are nearly flat) but deterministic
under ``torch.manual_seed(0)``: greedy margins are still ~4e-4, far above the ~1e-6
noise between padded and unpadded batches, and some rows emit EOS on their own.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from pipeline.data.chat import chat_format
from pipeline.generation.decoding import (
    DecodingConfig,
    as_conversation,
    decode_responses,
    encode_prompts,
    generate,
    generate_ids,
    generation_config,
)
from pipeline.generation.stops import stop_mask

pytestmark = pytest.mark.unit

DECODING_DIR = Path(__file__).resolve().parents[3] / "conf" / "decoding"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "where is the red tower",
             "the river runs to the sea", "who lives in the old house"]
PROMPTS = ["the cat sat", "where is the red tower", "a dog",
           "who lives in the old house by the sea", "the river"]
CONVS = [as_conversation(p) for p in PROMPTS]


def dec(name="greedy", do_sample=False, temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
        max_new_tokens=16) -> DecodingConfig:
    return DecodingConfig(name=name, do_sample=do_sample, temperature=temperature, top_k=top_k,
                          top_p=top_p, num_beams=num_beams, max_new_tokens=max_new_tokens)


GREEDY = dec()
SAMPLE = dec("sample", do_sample=True)


# --- fixtures -------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (27 tokens) with a dedicated pad: pad id 0 != eos id 1."""
    specials = ["<|pad|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>",
                                 unk_token="<|unk|>", additional_special_tokens=specials[3:])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def fmt(tokenizer):
    return chat_format(tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer)


@pytest.fixture(scope="module")
def batch(fmt):
    return encode_prompts(fmt, CONVS)


def run(model, fmt, batch, d, seed=None):
    return generate_ids(model, *batch, d, fmt, generator_seed=seed)


def first_eos_mask(ids, eos):
    return stop_mask(ids, torch.tensor([eos])).long()


# --- decoding strategies --------------------------------------------------------------


def test_greedy_equals_beam_search_with_one_beam(model, fmt, batch):
    greedy_ids, _ = run(model, fmt, batch, GREEDY)
    beam_ids, _ = run(model, fmt, batch, dec("beam", num_beams=1))
    assert torch.equal(greedy_ids, beam_ids)


def test_greedy_with_kv_cache_equals_argmax_of_full_forward(model, fmt):
    # The cached incremental decode must pick what a from-scratch forward pass picks.
    input_ids, attention_mask = encode_prompts(fmt, CONVS[:1])
    ids, _ = generate_ids(model, input_ids, attention_mask, dec(max_new_tokens=6), fmt, None)
    seq = input_ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(ids, seq[:, input_ids.shape[1]:])


def test_top_k_1_sampling_equals_greedy(model, fmt, batch):
    greedy_ids, _ = run(model, fmt, batch, GREEDY)
    top1_ids, _ = run(model, fmt, batch, dec("top1", do_sample=True, top_k=1), seed=123)
    assert torch.equal(greedy_ids, top1_ids)


def test_seeded_sample_reproduces_and_another_seed_differs(model, fmt, batch):
    a, mask_a = run(model, fmt, batch, SAMPLE, seed=7)
    b, mask_b = run(model, fmt, batch, SAMPLE, seed=7)
    c, _ = run(model, fmt, batch, SAMPLE, seed=8)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    width = min(a.shape[1], c.shape[1])
    assert not torch.equal(a[:, :width], c[:, :width])


def test_beam_search_runs_and_returns_only_new_tokens(model, fmt, batch):
    ids, mask = run(model, fmt, batch, dec("beam", num_beams=4, max_new_tokens=8))
    assert ids.shape[0] == len(PROMPTS) and ids.shape[1] <= 8 and mask.shape == ids.shape
    assert torch.equal(mask, first_eos_mask(ids, fmt.tokenizer.eos_token_id))


@pytest.mark.parametrize("p, kept", [
    (0.5, [0]),        # 0.5 alone reaches 0.5
    (0.79, [0, 1]),    # 0.5 < 0.79 <= 0.5 + 0.3
    (0.8, [0, 1]),     # 0.5 + 0.3 reaches 0.8 exactly: 0.15 is not needed
    (0.81, [0, 1, 2]), # 0.8 falls short, 0.95 reaches it
    (0.96, [0, 1, 2, 3]),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    # The warper generate() builds from top_p. float32 on purpose: generate casts the
    # scores to float32 before the warpers, and p=0.8 is an exact tie (1 - 0.8 vs the
    # tail mass 0.05 + 0.15), which float32 resolves as the definition says.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = TopPLogitsWarper(top_p=p)(torch.zeros(1, 1, dtype=torch.long), probs.log()[None])  # (1, V)
    survived = torch.isfinite(out[0])
    assert survived.nonzero().flatten().tolist() == kept
    assert torch.all(out[0][~survived] == -float("inf"))
    assert torch.allclose(out[0][survived], probs.log()[survived])  # survivors untouched


# --- generation_config: what reaches HF ------------------------------------------------


def test_generation_config_is_explicit(fmt):
    gc = generation_config(SAMPLE, fmt)
    assert gc.eos_token_id == [fmt.tokenizer.eos_token_id] == [1] and gc.pad_token_id == 0
    assert (gc.top_k, gc.top_p, gc.temperature) == (0, 1.0, 1.0)  # 0, not HF's 50
    assert gc.repetition_penalty == 1.0 and gc.min_new_tokens == 0 and gc.no_repeat_ngram_size == 0
    # Greedy/beam leave the warper settings unset (HF ignores and warns about them there).
    greedy = generation_config(GREEDY, fmt)
    assert greedy.top_k is None and greedy.top_p is None and greedy.temperature is None


def test_generation_config_rejects_bad_settings(fmt):
    generation_config(dec(max_new_tokens=1, num_beams=1), fmt)  # the smallest valid settings
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        generation_config(dec(max_new_tokens=0), fmt)
    with pytest.raises(ValueError, match="num_beams=0 must be >= 1"):
        generation_config(dec(num_beams=0), fmt)
    with pytest.raises(ValueError, match="temperature"):
        generation_config(dec(do_sample=True, temperature=0.0), fmt)
    with pytest.raises(ValueError, match="top_p"):
        generation_config(dec(do_sample=True, top_p=0.0), fmt)
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        generation_config(dec(do_sample=True, top_p=1.5), fmt)
    generation_config(dec(do_sample=True, top_p=1.0), fmt)  # 1.0 = off, allowed


def test_hub_generation_config_does_not_leak_through_the_loader(model, tokenizer, fmt, batch, tmp_path):
    # A checkpoint whose generation_config.json forbids repeats, forces a minimum length and
    # suppresses the eos token, as hub models may: loaded the pipeline's way, none of it applies.
    from transformers import GenerationConfig

    from pipeline.models.loading import load_causal_lm, load_tokenizer
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    GenerationConfig(no_repeat_ngram_size=1, min_new_tokens=12, suppress_tokens=[1], repetition_penalty=1.5,
                     do_sample=True, top_k=3, eos_token_id=1, pad_token_id=0).save_pretrained(tmp_path)
    cfg = OmegaConf.create({"chat_template": None, "trust_remote_code": False, "dtype": "float32",
                            "load_in_4bit": False})
    loaded_fmt = load_tokenizer(str(tmp_path), cfg)
    loaded = load_causal_lm(str(tmp_path), cfg, loaded_fmt).eval()
    for d in (GREEDY, SAMPLE):
        want, _ = run(model, fmt, batch, d, seed=5)
        got, _ = run(loaded, loaded_fmt, batch, d, seed=5)
        assert torch.equal(got, want), d.name
    assert not torch.equal(run(model, fmt, batch, dec(max_new_tokens=16), seed=5)[0],
                           model.generate(input_ids=batch[0], attention_mask=batch[1], max_new_tokens=16,
                                          do_sample=False, no_repeat_ngram_size=1, pad_token_id=0))


@pytest.mark.parametrize("d, expect_top_k, expect_top_p", [
    (SAMPLE, False, False),
    (dec("top_k", do_sample=True, top_k=10), True, False),
    (dec("top_p", do_sample=True, top_p=0.9), False, True),
])
def test_only_the_configured_warpers_run(model, fmt, batch, monkeypatch, d, expect_top_k,
                                         expect_top_p):
    # A checkpoint whose generation_config.json asks for top_k=5 and a repetition penalty
    # (as some hub models do) must not change our decoding: explicit kwargs win.
    monkeypatch.setattr(model.generation_config, "top_k", 5)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    called = set()

    def spy_on(cls):
        original = cls.__call__

        def spy(self, input_ids, scores):  # same two-argument signature HF inspects
            called.add(cls.__name__)
            return original(self, input_ids, scores)

        monkeypatch.setattr(cls, "__call__", spy)

    for cls in (TopKLogitsWarper, TopPLogitsWarper, RepetitionPenaltyLogitsProcessor):
        spy_on(cls)
    run(model, fmt, batch, dec(d.name, d.do_sample, d.temperature, d.top_k, d.top_p,
                                     max_new_tokens=3), seed=0)
    assert ("TopKLogitsWarper" in called) == expect_top_k
    assert ("TopPLogitsWarper" in called) == expect_top_p
    assert "RepetitionPenaltyLogitsProcessor" not in called


# --- masks, padding, decoding ---------------------------------------------------------


def test_mask_stops_after_first_eos():
    eos, pad = 1, 0
    ids = torch.tensor([[5, eos, 7, eos, pad],   # second EOS and pad are past the end
                        [5, 6, 7, 8, 9],         # never ended: truncated, all real
                        [eos, pad, 5, 6, 7],     # empty response: just the EOS
                        [pad, 5, eos, pad, pad]])  # a sampled pad id is still a real token
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 1],
                             [1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0]])
    assert torch.equal(first_eos_mask(ids, eos), expected)


def test_generated_mask_matches_first_eos(model, fmt, batch):
    ids, mask = run(model, fmt, batch, SAMPLE, seed=0)
    eos, pad = fmt.tokenizer.eos_token_id, fmt.pad_id
    lengths = mask.sum(1)
    # The case must be non-trivial: some rows end with EOS, some run to the limit.
    assert (lengths < ids.shape[1]).any() and (lengths == SAMPLE.max_new_tokens).any()
    for row, n in zip(ids, lengths.tolist()):
        if n < SAMPLE.max_new_tokens:
            assert row[n - 1] == eos and (row[:n - 1] != eos).all()
            assert (row[n:] == pad).all()  # HF fills finished rows with the pad id


def test_encode_prompts_left_pads(tokenizer, fmt):
    input_ids, attention_mask = encode_prompts(fmt, [as_conversation("the cat"),
                                                     as_conversation("where is the red tower now")])
    pad = tokenizer.pad_token_id
    # "<|user|> the cat <|eos|> <|assistant|>" is 5 tokens, the long one 9: 4 pads, left.
    assert attention_mask.tolist() == [[0] * 4 + [1] * 5, [1] * 9]
    assert (input_ids[0, :4] == pad).all() and (input_ids[:, 4:] != pad).all()
    assert tokenizer.convert_ids_to_tokens(input_ids[0, 4:].tolist()) == [
        "<|user|>", "the", "cat", "<|eos|>", "<|assistant|>"]


def test_batched_greedy_equals_one_prompt_at_a_time(model, fmt, batch):
    ids, mask = run(model, fmt, batch, GREEDY)
    assert (mask.sum(1) < ids.shape[1]).any()  # one prompt stops early: padding after EOS
    for i, prompt in enumerate(CONVS):
        alone_ids, alone_mask = generate_ids(model, *encode_prompts(fmt, [prompt]), GREEDY, fmt, None)
        t = alone_ids.shape[1]
        assert torch.equal(ids[i, :t], alone_ids[0]) and torch.equal(mask[i, :t], alone_mask[0])
        assert not mask[i, t:].any()
    texts = generate(model, fmt, CONVS, GREEDY, batch_size=len(PROMPTS), seed=None)
    assert texts == generate(model, fmt, CONVS, GREEDY, batch_size=2, seed=None)
    assert texts == generate(model, fmt, CONVS, GREEDY, batch_size=1, seed=None)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        generate(model, fmt, CONVS, GREEDY, batch_size=0, seed=None)


def test_decode_stops_at_first_eos(tokenizer, fmt):
    t = tokenizer.convert_tokens_to_ids
    ids = torch.tensor([[t("the"), t("cat"), t("<|eos|>"), t("dog"), t("<|pad|>")],
                        [t("<|user|>"), t("sea"), t("runs"), t("sea"), t("sea")]])
    texts = decode_responses(fmt, ids, first_eos_mask(ids, t("<|eos|>")))
    assert texts == ["the cat", "sea runs sea sea"]  # special tokens skipped


def test_decode_drops_a_stop_token_that_is_not_a_special_token(tokenizer):
    # A stop id from a generation_config may be an ordinary token, which skip_special_tokens keeps.
    from types import SimpleNamespace
    t = tokenizer.convert_tokens_to_ids
    fmt = SimpleNamespace(stop_ids=(t("dog"),), tokenizer=tokenizer)
    ids = torch.tensor([[t("the"), t("cat"), t("dog"), t("sea")]])
    assert decode_responses(fmt, ids, torch.tensor([[1, 1, 1, 0]])) == ["the cat"]


def test_generate_returns_one_clean_string_per_prompt(model, fmt):
    texts = generate(model, fmt, CONVS, SAMPLE, batch_size=2, seed=3)
    assert len(texts) == len(PROMPTS) and all(isinstance(s, str) for s in texts)
    assert not any("<|" in s or s != s.strip() for s in texts)
    assert texts == generate(model, fmt, CONVS, SAMPLE, batch_size=2, seed=3)


# --- conf/decoding --------------------------------------------------------------------


EXPECTED = {  # (do_sample, temperature, top_k, top_p, num_beams), max_new_tokens is 48
    "greedy": (False, 1.0, 0, 1.0, 1),
    "beam": (False, 1.0, 0, 1.0, 4),
    "sample": (True, 1.0, 0, 1.0, 1),
    "top_k": (True, 1.0, 10, 1.0, 1),
    "top_p": (True, 1.0, 0, 0.9, 1),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decoding_yaml_fits_the_schema(name, fmt):
    raw = OmegaConf.load(DECODING_DIR / f"{name}.yaml")
    # The defaults list is Hydra's (it attaches the registered schema); the rest is data.
    assert list(raw.pop("defaults")) == ["decoding_schema", "_self_"]
    cfg = OmegaConf.merge(OmegaConf.structured(DecodingConfig), raw)
    d = OmegaConf.to_object(cfg)
    assert isinstance(d, DecodingConfig) and d.name == name and d.max_new_tokens == 48
    assert (d.do_sample, d.temperature, d.top_k, d.top_p, d.num_beams) == EXPECTED[name]
    generation_config(d, fmt)  # and every file is a valid strategy


def test_decoding_group_composes_with_hydra():
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401  (registers decoding/decoding_schema)

    with initialize_config_dir(config_dir=str(DECODING_DIR.parent), version_base="1.3"):
        cfg = compose(config_name=None, overrides=["+decoding=top_p"])
        assert cfg.decoding.top_p == 0.9
        with pytest.raises(Exception, match="top_k"):  # the schema types the fields
            compose(config_name=None, overrides=["+decoding=top_p", "decoding.top_k=ten"])


def test_generate_refuses_bad_decoding_before_loading_any_model(root):
    from pipeline.core.errors import ConfigError
    from stages import generate as generate_stage
    from tests.conftest import compose_config
    # The empty root has no artifact: a ConfigError (not "run make sft") proves the check came first.
    cfg = compose_config("generate", ["stage=sft", "prompt=hi", "decoding=sample", "decoding.temperature=0"])
    with pytest.raises(ConfigError, match=r"temperature=0.0 must be > 0"):
        generate_stage.run(cfg)
