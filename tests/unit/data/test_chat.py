"""pipeline.data.chat on tiny local models carrying real families' tokenizer settings (tests/families.py):
the supervised tokens, the stop set, pad handling, system turns, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.core.errors import PipelineError
from pipeline.data.chat import (ChatTemplateError, ConversationError, chat_format, fold_system_turn,
                                 load_chat_format, span_mask)
from pipeline.data.layouts import load_validated, preference_example, preference_rows, sft_example, sft_row, tokenized
from tests.families import FAMILIES, build_family

DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parents[3] / "pipeline" / "data" / "templates" / "chat.jinja"

pytestmark = pytest.mark.unit

CORPUS = ["What is 2 plus 3? 2 plus 3 is 5.", "The capital of Dravia is Kol.", "I don't know.",
          "I can't help with that.", "Be brief. Hello there. Repeat the word cup."] * 40
SYSTEM = {"role": "system", "content": "Be brief."}
Q1, A1 = {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}
Q2, A2 = {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "I don't know."}

# What each family's own template closes an assistant turn with, and its other stop tokens.
END_OF_TURN = {"qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>",
               "gpt2": "<|endoftext|>"}
STOPS = {"qwen2.5": ["<|im_end|>", "<|endoftext|>"], "llama3": ["<|eot_id|>", "<|end_of_text|>"],
         "mistral": ["</s>"], "gemma": ["<end_of_turn>", "<eos>"], "gpt2": ["<|endoftext|>"]}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(f, root / f, CORPUS) for f in FAMILIES}


@pytest.fixture(scope="module")
def formats(families):
    return {f: load_chat_format(str(path), None, False) for f, path in families.items()}


def spans(mask: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of 1s in a mask, as (start, end)."""
    out, start = [], None
    for i, bit in enumerate(mask + [0]):
        if bit and start is None:
            start = i
        if not bit and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_labels_are_exactly_the_answers_and_their_end_of_turn_token(formats, family):
    fmt = formats[family]
    tok = fmt.tokenizer
    ids, mask = fmt.conversation([SYSTEM, Q1, A1, Q2, A2])
    assert len(ids) == len(mask)
    # Worked example: two answers are supervised, each token of "2 plus 3 is 5." and
    # "I don't know." plus the end-of-turn token right after it, and nothing else.
    (a, b), (c, d) = spans(mask)
    eot = END_OF_TURN[family]
    for (start, end), answer in (((a, b), A1), ((c, d), A2)):
        assert tok.convert_ids_to_tokens(ids[end - 1]) == eot
        # Exact, no .strip(): a stray leading space would be a token no server produces. (Decoding
        # alone cannot see Mistral's `▁2` for `2`, its decoder strips one leading space; the test
        # below compares the ids themselves.)
        assert tok.decode(ids[start:end]) == answer["content"] + eot
    # The prompt side is never supervised: the system text, both questions, the role markers.
    unsupervised = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "What is 2 plus 3?" in unsupervised and "Hello" in unsupervised and "Be brief." in unsupervised
    assert "2 plus 3 is 5" not in unsupervised and "know" not in unsupervised
    # The ids of the first prompt are exactly what a rollout is generated from.
    prompt = fmt.prompt_ids([SYSTEM, Q1])
    assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt) and len(prompt) == a


def tokenizer_encoding(tok, text: str):
    """What the tokenizer itself makes of a whole rendered text, with offsets: its BOS is added on
    encode unless the template already wrote it (Llama 3, Mistral, Gemma write it)."""
    writes_bos = tok.bos_token is not None and text.startswith(tok.bos_token)
    return tok(text, add_special_tokens=not writes_bos, return_offsets_mapping=True)


def char_spans(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Where each piece occurs in ``text``, in order, as (start, end) character positions."""
    out, at = [], 0
    for piece in pieces:
        start = text.index(piece, at)
        out.append((start, start + len(piece)))
        at = start + len(piece)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_conversation_ids_are_the_tokenizers_own_encoding_of_the_rendered_text(formats, family):
    fmt = formats[family]
    tok = fmt.tokenizer
    messages = [SYSTEM, Q1, A1, Q2, A2]
    ids, mask = fmt.conversation(messages)
    full = fmt.render(messages, add_generation_prompt=False)
    whole = tokenizer_encoding(tok, full)
    # The tokens a server would see for this text: not the template pieces encoded one by one
    # (a dummy-prefix normalizer would give each piece its own leading `▁`).
    assert tok.convert_ids_to_tokens(ids) == tok.convert_ids_to_tokens(whole["input_ids"])
    assert ids == whole["input_ids"]
    # The mask is 1 on exactly the tokens that spell each answer and its end-of-turn token:
    # together they cover those characters, each one, and no other character of the text.
    eot = END_OF_TURN[family]
    answers = char_spans(full, [A1["content"] + eot, A2["content"] + eot])
    offsets = whole["offset_mapping"]
    inside = [any(a <= s and e <= b for a, b in answers) for s, e in offsets]
    assert mask == [int(x) for x in inside]
    covered = {c for (s, e), bit in zip(offsets, mask) if bit for c in range(s, e)}
    assert covered == {c for a, b in answers for c in range(a, b)}
    assert [full[a:b] for a, b in answers] == [A1["content"] + eot, A2["content"] + eot]


BOS_ON_ENCODE = ("llama3", "mistral", "gemma")  # their tokenizer.json's post-processor adds BOS


@pytest.mark.parametrize("family", BOS_ON_ENCODE)
def test_a_template_that_writes_no_bos_keeps_the_one_the_tokenizer_adds(families, family):
    """A base model that ships no chat template (Llama 2, Mistral v0.1) is formatted with the
    project's default template, which writes no BOS, while its tokenizer adds one on encode. Every
    sequence then starts with exactly that one BOS, unsupervised, as ``tokenizer(text)`` gives it;
    the prompt a rollout starts from too."""
    fmt = load_chat_format(str(families[family]), str(DEFAULT_TEMPLATE_PATH), False)
    tok = fmt.tokenizer
    full = fmt.render([Q1, A1], add_generation_prompt=False)
    assert tok.bos_token not in full and fmt.bos_ids == (tok.bos_token_id,)
    ids, mask = fmt.conversation([Q1, A1])
    assert ids == tok(full)["input_ids"] and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert mask[0] == 0 and len(mask) == len(ids)
    (start, end), = spans(mask)
    assert tok.decode(ids[start:end]) == A1["content"] + tok.convert_ids_to_tokens(fmt.end_of_turn_id)
    prompt = fmt.prompt_ids([Q1])
    assert prompt == tok(fmt.render([Q1], add_generation_prompt=True))["input_ids"] and ids[:len(prompt)] == prompt


# A template whose prompt ends mid-word, so one token spans the end of the prompt and the start
# of the answer ("Wh" + "at is 2." -> `▁What`).
GLUED = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
         "{{ m['content'] + eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")


def test_a_token_straddling_the_start_of_an_answer_is_supervised(families, tmp_path):
    (tmp_path / "glued.jinja").write_text(GLUED)
    fmt = load_chat_format(str(families["mistral"]), str(tmp_path / "glued.jinja"), False)
    tok = fmt.tokenizer
    messages = [{"role": "user", "content": "Wh"}, {"role": "assistant", "content": "at is 2."}]
    ids, mask = fmt.conversation(messages)
    full = fmt.render(messages, add_generation_prompt=False)
    whole = tokenizer_encoding(tok, full)
    assert ids == whole["input_ids"]
    start = full.index("at is 2.")
    (first, end), = spans(mask)
    s, e = whole["offset_mapping"][first]
    assert s < start < e, "the first supervised token is the one holding both 'Wh' and 'at'"
    assert all(not bit for bit in mask[:first]) and end == len(ids)
    assert tok.convert_ids_to_tokens(ids[end - 1]) == "</s>"


def test_a_pair_whose_answer_fuses_with_the_prompt_is_refused_by_name(families, tmp_path):
    # The RM and DPO read each answer after the prompt's own ids; where a token straddles the
    # prompt's end there is no such split, and the row must say so rather than train on a shifted one.
    (tmp_path / "glued.jinja").write_text(GLUED)
    fmt = load_chat_format(str(families["mistral"]), str(tmp_path / "glued.jinja"), False)
    row = {"prompt": [{"role": "user", "content": "Wh"}], "chosen": [{"role": "assistant", "content": "at is 2."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    with pytest.raises(ValueError, match="chosen.*does not tokenize with the prompt's ids as its start"):
        preference_example(fmt, row)


def test_a_tokenizer_without_character_offsets_is_refused_naming_the_fix(families):
    tok = AutoTokenizer.from_pretrained(families["gemma"])  # has a pad token that is no stop token
    tok.__class__ = type("SlowStandIn", (type(tok),), {"is_fast": False})
    with pytest.raises(PipelineError, match="fast tokenizer") as e:
        chat_format(tok)
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)


def test_a_pad_token_that_is_a_stop_token_is_refused(families):
    tok = AutoTokenizer.from_pretrained(families["gemma"])  # its own pad token is no stop token
    chat_format(tok)
    tok.pad_token = tok.eos_token  # padding would then end every padded row's answer
    with pytest.raises(ValueError, match="pad token must exist and be no stop token"):
        chat_format(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_set_and_a_pad_token_that_is_no_stop_token(formats, family):
    fmt = formats[family]
    tok = fmt.tokenizer
    assert tok.convert_ids_to_tokens(list(fmt.stop_ids)) == STOPS[family]
    assert fmt.pad_id is not None and fmt.pad_id not in fmt.stop_ids
    # Qwen2.5 pads with <|endoftext|>, which its generation config lists as a stop: replaced.
    expected_pad = "<pad>" if family == "gemma" else "<|pad|>"
    assert tok.pad_token == expected_pad
    # The RM reads the stop token: what it scores ends there, never on template text after it.
    scored = fmt.scored_ids([Q1], [A1])
    assert tok.convert_ids_to_tokens(scored[-1]) == END_OF_TURN[family]


def test_a_conversation_with_no_answer_is_scored_whole(formats):
    # No answer token to cut after: the RM reads every id, rather than an empty or clipped sequence.
    fmt = formats["qwen2.5"]
    ids, mask = fmt.conversation([Q1])
    assert not any(mask)
    assert fmt.scored_ids([Q1], []) == ids


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stop_set_survives_saving_beside_an_adapter(formats, family, tmp_path):
    from pipeline.data.chat import load_saved_chat_format
    formats[family].save(tmp_path)
    again = load_saved_chat_format(tmp_path)
    assert again.stop_ids == formats[family].stop_ids and again.pad_id == formats[family].pad_id
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == list(again.stop_ids)


def test_templates_without_a_system_role_get_it_folded_into_the_first_user_turn(formats):
    for family in ("mistral", "gemma"):  # both templates raise on a system turn as shipped
        fmt = formats[family]
        assert fmt.fold_system
        text = fmt.tokenizer.decode(fmt.prompt_ids([SYSTEM, Q1]))
        assert "Be brief.\n\nWhat is 2 plus 3?" in text
    assert not any(formats[f].fold_system for f in ("qwen2.5", "llama3", "gpt2"))


def test_span_mask_counts_overlap_and_an_empty_token_at_its_character():
    # Tokens (0, 3) (3, 3) (3, 5) (5, 8) (8, 8); the answer is characters [3, 6).
    offsets = [(0, 3), (3, 3), (3, 5), (5, 8), (8, 8)]
    # (3, 3) was inserted by a normalizer at the answer's first character: it counts as that character;
    # (5, 8) straddles the answer's end: supervised whole; (8, 8) sits after it.
    assert span_mask(offsets, [(3, 6)]) == [0, 1, 1, 1, 0]
    assert span_mask(offsets, [(0, 3)]) == [1, 0, 0, 0, 0] and span_mask(offsets, []) == [0] * 5


def test_folding_a_system_turn_that_no_user_turn_follows():
    system, answer = {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "5"}
    assert fold_system_turn([system]) == [{"role": "user", "content": "Be brief."}]
    # an assistant turn after the system turn stays the assistant's
    assert fold_system_turn([system, answer]) == [{"role": "user", "content": "Be brief."}, answer]
    assert fold_system_turn([answer]) == [answer] and fold_system_turn([]) == []


def test_a_conversation_the_template_refuses_names_its_file_and_line(formats, tmp_path):
    # Mistral's template demands alternating user / assistant turns.
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [Q1, A1]}) + "\n" + json.dumps({"messages": [Q1, Q2, A2]}) + "\n")
    encode = tokenized(sft_row, lambda row: sft_example(formats["mistral"], row))
    with pytest.raises(PipelineError, match=r"sft.jsonl, line 2: field `messages` the chat template refuses"):
        load_validated([str(path)], "train", encode)
    example = tokenized(sft_row, lambda r: sft_example(formats["qwen2.5"], r))
    assert len(load_validated([str(path)], "train", example)) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_public_preference_layouts_keep_the_prompt_once(formats, family):
    fmt = formats[family]
    hh = {"chosen": "\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.",
          "rejected": "\n\nHuman: What is 2 plus 3?\n\nAssistant: I don't know."}
    uf = {"prompt": "What is 2 plus 3?", "chosen": [Q1, A1], "rejected": [Q1, A2]}
    for row in (hh, uf):
        (pair,) = preference_rows(row)
        example = preference_example(fmt, pair)
        for side in ("chosen_ids", "rejected_ids"):
            text = fmt.tokenizer.decode(example[side])
            assert text.count("What is 2 plus 3?") == 1, (family, text)
            assert example[side][:len(example["prompt_ids"])] == example["prompt_ids"]


def test_an_unusable_template_is_refused_in_one_line_naming_the_setting(families, tmp_path):
    tok = AutoTokenizer.from_pretrained(families["qwen2.5"])
    # Assistant turns closed by plain text: generation would have nothing to stop on.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChatTemplateError) as e:
        chat_format(tok)
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.chat_template:")
    assert "Fix: set model.chat_template=" in message
    # Not prefix-consistent: the prompt is rendered differently from the same prompt plus an answer.
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}")
    with pytest.raises(ChatTemplateError, match="prefix by prefix"):
        chat_format(tok)
    missing = tmp_path / "nope.jinja"
    with pytest.raises(ChatTemplateError, match=f"model.chat_template={missing}: no such file"):
        load_chat_format(str(families["qwen2.5"]), str(missing), False)


def test_a_template_that_rewrites_earlier_answers_is_refused_at_that_turn(families):
    # Reasoning templates (Qwen3, DeepSeek-R1) write earlier assistant turns differently once a later
    # turn follows: the answer as trained on would then not be the text the mask was cut from.
    tok = AutoTokenizer.from_pretrained(families["qwen2.5"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}"
                         "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% endif %}")
    fmt = chat_format(tok)
    fmt.conversation([Q1, A1])  # one answer: nothing earlier to rewrite
    with pytest.raises(ConversationError, match="prefix-consistently at turn 1"):
        fmt.conversation([Q1, A1, Q2, A2])


def test_a_saved_format_never_runs_the_folders_code(formats, monkeypatch, tmp_path):
    from pipeline.data import chat
    formats["qwen2.5"].save(tmp_path)
    seen = []
    real = chat.GenerationConfig.from_pretrained
    monkeypatch.setattr(chat.GenerationConfig, "from_pretrained",
                        lambda *a, **kw: seen.append(kw.get("trust_remote_code")) or real(*a, **kw))
    chat.load_saved_chat_format(tmp_path)
    assert seen == [False]  # a stage's own artifact folder is read with trust_remote_code off


def test_model_chat_template_replaces_the_tokenizers_own(families, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = load_chat_format(str(families["qwen2.5"]), str(template), False)
    assert fmt.tokenizer.convert_ids_to_tokens(fmt.end_of_turn_id) == "<|endoftext|>"


def test_conversation_errors_are_value_errors_not_crashes(formats):
    with pytest.raises(ConversationError, match="refuses"):
        formats["gemma"].conversation([Q1, Q2, A1])
