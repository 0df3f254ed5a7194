"""The tiny family checkouts of tests/families.py carry each hub family's real settings.

Every family is built once per module from a short inline corpus and reloaded the way
a hub checkout is (AutoTokenizer / AutoModelForCausalLM / GenerationConfig).

These tests check the test fixtures, not the pipeline: that the builder turns
tests/fixtures/families/<family>.json and <family>.jinja into a checkout transformers loads
with those settings (several compare the built files with the very fixture they were built
from, so they pass whenever the builder copies the fixture faithfully, and say nothing about
whether the fixture is right; ``EXPECTED`` and ``RENDERED`` are written out independently to
guard that). Pipeline coverage on the families is in tests/unit/data/test_chat.py and
tests/stage/test_families_stage.py. The variants (``VARIANTS``: gemma2) only get a check that
they build with the architecture they claim; their tokenizer is the base family's.
"""

from __future__ import annotations

import json

import jinja2
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.families import FAMILIES, FIXTURES, VARIANTS, build_family, family_spec

pytestmark = pytest.mark.unit

CHAT_FAMILIES = [f for f in FAMILIES if f != "gpt2"]

# What the hub ships, written out independently of the <family>.json fixtures.
EXPECTED = {
    "qwen2.5": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                    end_of_turn="<|im_end|>", bos_on_encode=False, arch="Qwen2ForCausalLM",
                    specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "llama3": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None,
                   end_of_turn="<|eot_id|>", bos_on_encode=True, arch="LlamaForCausalLM",
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": dict(bos="<s>", eos="</s>", pad=None, unk="<unk>", end_of_turn="</s>",
                    bos_on_encode=True, arch="MistralForCausalLM",
                    specials=["<unk>", "<s>", "</s>"]),
    "gemma": dict(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", end_of_turn="<end_of_turn>",
                  bos_on_encode=True, arch="GemmaForCausalLM",
                  specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                            "<end_of_turn>"]),
    "gpt2": dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>",
                 end_of_turn=None, bos_on_encode=False, arch="GPT2LMHeadModel",
                 specials=["<|endoftext|>"]),
}

CONVERSATION = [{"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "5"}]
QWEN_SYSTEM = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
               "You are a helpful assistant.<|im_end|>\n")
RENDERED = {  # CONVERSATION through each real template
    "qwen2.5": QWEN_SYSTEM + "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
                             "<|im_start|>assistant\n5<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>",
    "mistral": "<s>[INST] What is 2 plus 3? [/INST]5</s>",
    "gemma": "<bos><start_of_turn>user\nWhat is 2 plus 3?<end_of_turn>\n"
             "<start_of_turn>model\n5<end_of_turn>\n",
}
AFTER_END_OF_TURN = {"qwen2.5": "\n", "llama3": "", "mistral": "", "gemma": "\n"}
TRIMS_CONTENT = {"qwen2.5": False, "llama3": True, "mistral": False, "gemma": True}


def _corpus() -> list[str]:
    places = [("Dravia", "Kol"), ("Ostrel", "Vanna"), ("Mirek", "Tallow"), ("Quessa", "Bruin"),
              ("Heldt", "Arno"), ("Sorrel", "Pike"), ("Ulmar", "Fenn"), ("Zabrin", "Lode")]
    lines = []
    for i in range(48):
        a, b = i % 12, (i * 5) % 9
        lines += [f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."]
    for country, city in places:
        lines += [f"The capital of {country} is {city}.", f"What is the capital of {country}?",
                  f"Is {city} the capital of {country}?",
                  f"Yes, {city} is the capital of {country}.",
                  f"Tell me about {country}.", f"{country} is a small country near the sea."]
    lines += ["I don't know.", "I can't help with that.", "Sorry, I am not sure about that.",
              "I won't answer that question.", "Let me think about it.", "That's a good question!",
              "Please ask me something else.", "Here is a short answer: no."] * 7
    return lines


CORPUS = _corpus()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(family, root / family, CORPUS, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(built):
    out = {}
    for family, path in built.items():
        out[family] = (AutoTokenizer.from_pretrained(path),
                       AutoModelForCausalLM.from_pretrained(path),
                       GenerationConfig.from_pretrained(path))
    return out


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_strings_and_roles(loaded, family):
    tok, _, _ = loaded[family]
    want = EXPECTED[family]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        want["bos"], want["eos"], want["pad"], want["unk"])
    if want["pad"] is None:
        assert tok.pad_token_id is None
    for special in want["specials"]:  # each is one token, never split into pieces
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(special)], special
    assert family_spec(family)["tokenizer"]["roles"]["pad_token"] == want["pad"]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_follow_the_hub_order(loaded, family):
    tok, _, _ = loaded[family]
    hub_ids = family_spec(family)["tokenizer"]["hub_ids"]
    by_hub = sorted(hub_ids, key=hub_ids.get)
    tiny = [tok.convert_tokens_to_ids(t) for t in by_hub]
    assert tiny == sorted(tiny)
    assert len(set(tiny)) == len(tiny)


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_on_encode(loaded, family):
    tok, _, _ = loaded[family]
    ids = tok("hi")["input_ids"]
    plain = tok("hi", add_special_tokens=False)["input_ids"]
    if EXPECTED[family]["bos_on_encode"]:
        assert ids[0] == tok.bos_token_id
        assert ids[1:] == plain
    else:
        assert ids == plain
    assert tok.bos_token_id not in plain and tok.eos_token_id not in ids


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_is_carried_by_the_tokenizer_json_post_processor(built, family):
    post = json.loads((built[family] / "tokenizer.json").read_text())["post_processor"]
    text = json.dumps(post)
    assert ("TemplateProcessing" in text) == EXPECTED[family]["bos_on_encode"]
    if EXPECTED[family]["bos_on_encode"]:
        assert EXPECTED[family]["bos"] in text


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_and_raw_tokenizers_agree(built, loaded, family):
    """What transformers encodes is what tokenizer.json alone encodes (vLLM, TGI, Rust)."""
    tok, _, _ = loaded[family]
    raw = Tokenizer.from_file(str(built[family] / "tokenizer.json"))
    for text in ["The capital of Dravia is Kol.", " leading space", "two  spaces\nnew line",
                 "Zürich 42 ☃", "I don't know ."]:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_tokenizer_config_keys(built, family):
    path = built[family]
    saved = json.loads((path / "tokenizer_config.json").read_text())
    hub = family_spec(family)["tokenizer"]["tokenizer_config"]
    assert set(saved) == set(hub)
    for key, value in hub.items():
        if key not in ("added_tokens_decoder", "chat_template"):
            assert saved[key] == value, key
    assert not (path / "chat_template.jinja").exists()  # inline, as in the hub repos


# ---------------------------------------------------------------- chat template


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_is_the_fixture_byte_for_byte(loaded, family):
    tok, _, _ = loaded[family]
    if family == "gpt2":
        assert tok.chat_template is None
        with pytest.raises(ValueError):
            tok.apply_chat_template(CONVERSATION, tokenize=False)
    else:
        assert tok.chat_template.encode("utf-8") == (FIXTURES / f"{family}.jinja").read_bytes()


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_two_turn_rendering(loaded, family):
    tok, _, _ = loaded[family]
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == RENDERED[family]
    end = EXPECTED[family]["end_of_turn"]
    # the reply ends with the end-of-turn token, then the template's own trailing text
    assert rendered.endswith("5" + end + AFTER_END_OF_TURN[family])
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(prompt)  # prompt + completion == whole conversation


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_content_trimming(loaded, family):
    tok, _, _ = loaded[family]
    padded = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": " 5 "}]
    rendered = tok.apply_chat_template(padded, tokenize=False)
    assert ("  hi  " not in rendered) == TRIMS_CONTENT[family]
    assert (" 5 " not in rendered) == TRIMS_CONTENT[family]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_system_message(loaded, family):
    tok, _, _ = loaded[family]
    messages = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    if family in ("mistral", "gemma"):
        with pytest.raises(jinja2.TemplateError):
            tok.apply_chat_template(messages, tokenize=False)
    else:
        assert "Be brief." in tok.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_template_bos_doubles_when_the_text_is_encoded_again(loaded, family):
    """Templates that write BOS themselves + a tokenizer that adds BOS = two BOS tokens."""
    tok, _, _ = loaded[family]
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    encoded = tok(rendered)["input_ids"]
    direct = tok.apply_chat_template(CONVERSATION, tokenize=True)
    direct = direct["input_ids"] if hasattr(direct, "keys") else direct
    if EXPECTED[family]["bos_on_encode"]:
        assert encoded[:2] == [tok.bos_token_id, tok.bos_token_id]
        assert direct[0] == tok.bos_token_id and direct[1] != tok.bos_token_id
    else:
        assert encoded == list(direct)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == list(direct)


# ---------------------------------------------------------------- generation config


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_config_as_shipped(loaded, family):
    tok, model, gen = loaded[family]
    for key, value in family_spec(family)["generation_config"].items():
        if key.endswith("_token_id"):
            value = ([tok.convert_tokens_to_ids(v) for v in value] if isinstance(value, list)
                     else tok.convert_tokens_to_ids(value))
        assert getattr(gen, key) == value, key
        assert getattr(model.generation_config, key) == value, key  # rides along with the model
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.eos_token_id in eos
    if EXPECTED[family]["end_of_turn"] is not None:
        assert tok.convert_tokens_to_ids(EXPECTED[family]["end_of_turn"]) in eos


def test_generation_config_specifics(loaded):
    qwen_tok, _, qwen = loaded["qwen2.5"]
    assert qwen.eos_token_id == [qwen_tok.convert_tokens_to_ids("<|im_end|>"),
                                 qwen_tok.convert_tokens_to_ids("<|endoftext|>")]
    assert qwen.pad_token_id == qwen.bos_token_id == qwen_tok.convert_tokens_to_ids("<|endoftext|>")
    assert (qwen.do_sample, qwen.repetition_penalty, qwen.temperature, qwen.top_p, qwen.top_k) == (
        True, 1.05, 0.7, 0.8, 20)
    llama_tok, _, llama = loaded["llama3"]
    assert llama.eos_token_id == [llama_tok.convert_tokens_to_ids("<|end_of_text|>"),
                                  llama_tok.convert_tokens_to_ids("<|eot_id|>")]
    assert (llama.do_sample, llama.temperature, llama.top_p) == (True, 0.6, 0.9)
    assert llama.pad_token_id is None
    gemma_tok, _, gemma = loaded["gemma"]
    assert gemma.eos_token_id == [gemma_tok.convert_tokens_to_ids("<eos>"),
                                  gemma_tok.convert_tokens_to_ids("<end_of_turn>")]
    assert gemma.pad_token_id == gemma_tok.pad_token_id
    gpt2_tok, _, gpt2 = loaded["gpt2"]
    assert gpt2.bos_token_id == gpt2.eos_token_id == gpt2_tok.convert_tokens_to_ids("<|endoftext|>")
    for family in ("mistral", "gemma", "gpt2"):
        assert not loaded[family][2].do_sample  # no sampling keys: greedy unless asked


def test_generation_config_file_keeps_the_sampling_keys(built):
    raw = json.loads((built["qwen2.5"] / "generation_config.json").read_text())
    keys = ("do_sample", "repetition_penalty", "temperature", "top_p", "top_k")
    assert {k: raw[k] for k in keys} == {"do_sample": True, "repetition_penalty": 1.05,
                                         "temperature": 0.7, "top_p": 0.8, "top_k": 20}


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("family", FAMILIES)
def test_model(built, loaded, family):
    tok, model, _ = loaded[family]
    assert type(model).__name__ == EXPECTED[family]["arch"]
    assert model.config.vocab_size == len(tok)
    ids = tok(["The capital of Dravia is Kol."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    hub = family_spec(family)["model_config"]  # qwen2.5: bos <|endoftext|> here, none in tokenizer
    assert model.config.bos_token_id == tok.convert_tokens_to_ids(hub["bos_token_id"])
    assert model.config.eos_token_id == tok.convert_tokens_to_ids(hub["eos_token_id"])
    if family == "gemma":
        assert model.config.pad_token_id == tok.pad_token_id
    else:
        assert model.config.pad_token_id is None
    config = json.loads((built[family] / "config.json").read_text())
    assert ("pad_token_id" in config) == (family == "gemma")
    assert (built[family] / "model.safetensors").exists()


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_greedy_generation_runs(loaded, family):
    tok, model, _ = loaded[family]
    prompt = tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic(built, tmp_path, family):
    again = build_family(family, tmp_path / "again", CORPUS, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (built[family] / name).read_bytes(), name
    other = build_family(family, tmp_path / "other", CORPUS, seed=1)
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_hub_dtype_loads_as_bfloat16_by_default(tmp_path):
    path = build_family("qwen2.5", tmp_path / "bf16", CORPUS, hub_dtype=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_gemma2_variant_is_gemmas_tokenizer_on_the_gemma2_sliding_window_layout(built, tmp_path):
    assert VARIANTS == ("gemma2",)
    path = build_family("gemma2", tmp_path / "gemma2", CORPUS, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # gemma's, byte for byte
        assert (path / name).read_bytes() == (built["gemma"] / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.sliding_window == 8
    assert GenerationConfig.from_pretrained(path).cache_implementation == "hybrid"
