"""Tiny local stand-ins for popular hub model families, for tests that cannot download.

``build_family(family, out_dir, corpus)`` writes a directory that loads like a hub
checkout of that family (``AutoTokenizer`` / ``AutoModelForCausalLM`` /
``GenerationConfig.from_pretrained``), only with a few hundred tokens and one layer.

Real, as the family ships it on the hub (sources in tests/fixtures/families/README.md):
  * the chat template, byte for byte (``tests/fixtures/families/<family>.jinja``);
  * special-token strings, their roles (bos / eos / pad / unk, none where the family has
    none), which are special, and the order of their ids;
  * the tokenizer pipeline kind: byte-level BPE with the family's split regex, or
    SentencePiece-converted BPE with byte fallback and the family's dummy-prefix rule;
  * BOS on encode (a ``TemplateProcessing`` post-processor in ``tokenizer.json`` for
    llama3 / mistral / gemma, none for qwen2.5 / gpt2) and the hub's
    ``tokenizer_config.json`` keys (``tokenizer_class``, ``legacy``, ``add_bos_token``,
    ``clean_up_tokenization_spaces``, ``model_max_length`` ...);
  * ``generation_config.json`` keys and values, sampling defaults included, with token
    ids mapped to the tiny vocabulary; bos / eos / pad ids in ``config.json``;
  * the model class (Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM,
    GemmaForCausalLM - the Gemma v1 architecture -, GPT2LMHeadModel).

Variants (``VARIANTS``, not in ``FAMILIES``): a family's tokenizer, template and generation
settings on another architecture, from an overlay ``<variant>.json`` naming its ``base``:
  * ``gemma2``: gemma's tokenizer on Gemma2ForCausalLM, two layers (sliding_attention, then
    full_attention, as the hub alternates them) with an 8-token sliding window, so that a
    KV cache (``DynamicCache(config=...)``) holds a ``DynamicSlidingWindowLayer`` that really
    drops keys on sequences of a test's length.

Not real: the vocabulary and merges (trained here on ``corpus``), so token ids and
segmentations differ from the hub's; the weights (random, seeded); the sizes (hidden 32,
1 layer, 2 heads, 1 kv head, 512 positions; a variant may change them with ``tiny_sizes``).
What each family leaves out is listed under ``not_reproduced`` in its ``<family>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    Gemma2ForCausalLM,
    GemmaForCausalLM,
    GenerationConfig,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "families"
FAMILIES = ("qwen2.5", "llama3", "mistral", "gemma", "gpt2")
# Architecture variants of a family (its tokenizer fixture, another model class): built on
# demand by the tests that need the architecture, not part of every per-family run.
VARIANTS = ("gemma2",)
VOCAB_SIZE = 700  # target size of the trained vocabulary, specials and byte pieces included

# The real split regexes: transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX and the Llama 3
# tokenizer.json pattern (tiktoken cl100k style, digits in groups of up to three).
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

_ARCH = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}
_MODEL_TYPE = {
    "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "GPT2LMHeadModel": "gpt2",
}


def family_spec(family: str) -> dict:
    """The family's settings as data: ``tests/fixtures/families/<family>.json``.

    A variant's file is an overlay on its ``base`` family's: its ``model_config``,
    ``generation_config`` and ``not_reproduced`` entries are added to (or replace) the base's,
    its other keys replace the base's."""
    if family not in FAMILIES + VARIANTS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + VARIANTS}")
    spec = json.loads((FIXTURES / f"{family}.json").read_text(encoding="utf-8"))
    if family in VARIANTS:
        base = family_spec(spec.pop("base"))
        for key in ("model_config", "generation_config", "not_reproduced"):
            base[key] = {**base[key], **spec.pop(key, {})}
        base.update(spec)
        spec = base
    return spec


def chat_template(family: str) -> str | None:
    """The verbatim hub chat template, or None for families that ship none (gpt2)."""
    name = family_spec(family)["chat_template"]
    return None if name is None else (FIXTURES / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------- tokenizer pipelines

def _pipeline(kind: str, training: bool):
    """(normalizer, pre_tokenizer, decoder, byte_level) of a family's tokenizer.json.

    ``training`` swaps the SentencePiece pipelines for an equivalent one that splits on
    the word boundary, so no learned piece spans two words (SentencePiece's own rule).
    """
    if kind == "qwen2":
        return (normalizers.NFC(),
                pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                decoders.ByteLevel(), True)
    if kind == "llama3":
        return (None,
                pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                             use_regex=False)]),
                decoders.ByteLevel(), True)
    if kind == "gpt2":
        return (None, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True),
                decoders.ByteLevel(), True)
    if kind == "mistral":
        if training:
            return (None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                   split=True), None, False)
        return (normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
                None,
                decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)]),
                False)
    if kind == "gemma":
        if training:
            return (None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                   split=True), None, False)
        return (normalizers.Replace(" ", "▁"),
                pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False),
                decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse()]),
                False)
    raise ValueError(f"unknown tokenizer pipeline {kind!r}")


def _post_processor(kind: str, bos: str | None, bos_id: int | None, add_bos: bool):
    """The post-processor as the family's tokenizer.json has it: BOS on encode or not."""
    byte_level = {
        "qwen2": processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        "llama3": processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        "gpt2": processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
    }.get(kind)
    if not add_bos:
        return byte_level
    template = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return template if byte_level is None else processors.Sequence([byte_level, template])


def _train_backend(spec: dict, corpus: list[str], vocab_size: int) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with the family's pipeline and a vocabulary from ``corpus``."""
    tok_spec = spec["tokenizer"]
    kind = tok_spec["pipeline"]
    layout = tok_spec["model_vocab"]
    first, last = layout["specials_first"], layout["specials_last"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)] if layout["byte_fallback_pieces"] else []
    added = tok_spec["added_tokens"]
    n_fixed = len(first) + len(byte_pieces) + len(last)
    n_added_only = len([t for t in added if t["content"] not in first + last])

    normalizer, pre_tokenizer, _, byte_level = _pipeline(kind, training=True)
    trainer_tok = Tokenizer(models.BPE())
    if normalizer is not None:
        trainer_tok.normalizer = normalizer
    trainer_tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - n_fixed - n_added_only, 64), min_frequency=1,
        show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
    )
    trainer_tok.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    vocab: dict[str, int] = {}
    for piece in first + byte_pieces + [p for p, _ in learned] + last:
        vocab.setdefault(piece, len(vocab))

    if byte_level:
        model = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                           continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                           byte_fallback=False, ignore_merges=(kind == "llama3"))
    else:
        model = models.BPE(vocab=vocab, merges=merges, dropout=None,
                           unk_token=spec["tokenizer"]["roles"]["unk_token"], fuse_unk=True,
                           byte_fallback=True)
    backend = Tokenizer(model)
    normalizer, pre_tokenizer, decoder, _ = _pipeline(kind, training=False)
    if normalizer is not None:
        backend.normalizer = normalizer
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    for token in added:  # one at a time: ids follow the hub's order
        backend.add_tokens([AddedToken(token["content"], special=token["special"],
                                       normalized=False, lstrip=False, rstrip=False,
                                       single_word=False)])
    if tok_spec["add_eos_token"]:
        raise NotImplementedError("no family here appends EOS on encode")
    bos = tok_spec["roles"]["bos_token"]
    backend.post_processor = _post_processor(kind, bos, backend.token_to_id(bos) if bos else None,
                                             tok_spec["add_bos_token"])
    return backend


def _save_tokenizer(spec: dict, backend: Tokenizer, out_dir: Path):
    """Wrap ``backend`` in the family's transformers class and save it like the hub has it.

    ``save_pretrained`` writes ``tokenizer.json``; ``tokenizer_config.json`` is then
    replaced by the hub file's keys (transformers 5 would drop ``add_bos_token``,
    ``legacy``... and move the template to ``chat_template.jinja``), with
    ``added_tokens_decoder`` ids mapped to the tiny vocabulary and the template inline,
    as in the hub repositories.
    """
    tok_spec = spec["tokenizer"]
    hub_config = tok_spec["tokenizer_config"]
    kwargs = {k: v for k, v in hub_config.items()
              if k not in ("tokenizer_class", "add_bos_token", "add_eos_token",
                           "added_tokens_decoder", "chat_template")
              and not k.endswith("_token")}
    cls = getattr(transformers, tok_spec["class"])  # e.g. Qwen2Tokenizer
    tokenizer = cls(tokenizer_object=backend, **tok_spec["roles"], **kwargs)
    template = chat_template(spec["family"])
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)

    written = {}
    for key, value in hub_config.items():
        if key == "added_tokens_decoder":
            value = {str(backend.token_to_id(t["content"])): {
                "content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": t["special"]} for t in tok_spec["added_tokens"]}
        elif key == "chat_template":
            value = template
        written[key] = value
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(written, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer


# ---------------------------------------------------------------- model

def _token_ids(values: dict, backend: Tokenizer) -> dict:
    """Map every ``*_token_id`` value (a token string or a list of them) to tiny-vocab ids."""
    out = {}
    for key, value in values.items():
        if key.endswith("_token_id") and value is not None:
            if isinstance(value, list):
                value = [_id(backend, v) for v in value]
            else:
                value = _id(backend, value)
        out[key] = value
    return out


def _id(backend: Tokenizer, token: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise KeyError(f"{token!r} is not in the tiny vocabulary")
    return token_id


def _model_config(spec: dict, backend: Tokenizer, vocab_size: int):
    arch = spec["architecture"]
    values = _token_ids(spec["model_config"], backend)
    if arch == "GPT2LMHeadModel":
        sizes = dict(n_embd=32, n_layer=1, n_head=2, n_inner=64, n_positions=512)
    else:
        sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512)
    sizes.update(spec.get("tiny_sizes", {}))
    config = AutoConfig.for_model(_MODEL_TYPE[arch], vocab_size=vocab_size, **sizes, **values)
    config.architectures = [arch]
    return config


def build_family(family: str, out_dir: Path, corpus: list[str], seed: int = 0, *,
                 vocab_size: int = VOCAB_SIZE, hub_dtype: bool = False) -> Path:
    """Write a tiny ``family`` checkout to ``out_dir`` and return ``out_dir``.

    The tokenizer is trained on ``corpus`` (a few hundred short lines is plenty; the
    vocabulary stops growing once every word is one token, so ``vocab_size`` is an upper
    bound), so the same corpus gives the same vocabulary; the weights are drawn from
    ``seed``. Weights are float32 unless ``hub_dtype``: then they and ``config.json`` carry
    the family's hub dtype (bfloat16 for all but gpt2), which transformers 5 loads by
    default (``from_pretrained`` uses ``dtype="auto"``).
    """
    spec = family_spec(family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    backend = _train_backend(spec, list(corpus), vocab_size)
    tokenizer = _save_tokenizer(spec, backend, out_dir)

    config = _model_config(spec, backend, len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _ARCH[spec["architecture"]](config)
    model.eval()
    if hub_dtype:
        model = model.to(getattr(torch, spec["hub_dtype"]))

    # generation_config.json as the family ships it (sampling keys included)
    generation = GenerationConfig(**_token_ids(spec["generation_config"], backend))
    model.generation_config = generation
    model.save_pretrained(out_dir)  # safetensors
    generation.save_pretrained(out_dir)

    if "pad_token_id" not in spec["model_config"]:
        # transformers 5 writes "pad_token_id": null; the hub config.json has no such key
        config_path = out_dir / "config.json"
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        if saved.get("pad_token_id", 0) is None:
            del saved["pad_token_id"]
            config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    return out_dir


if __name__ == "__main__":
    # python -m tests.families qwen2.5 /tmp/tiny-qwen [corpus.jsonl]: a local stand-in to try the
    # pipeline's "bring your own model" commands on without a hub (README).
    import sys

    if len(sys.argv) not in (3, 4) or sys.argv[1] not in FAMILIES + VARIANTS:
        raise SystemExit(f"usage: python -m tests.families {{{','.join(FAMILIES + VARIANTS)}}} OUT_DIR [CORPUS.jsonl]")
    source = Path(sys.argv[3] if len(sys.argv) == 4 else "data/world/pretrain.jsonl")
    if not source.is_file():
        raise SystemExit(f"{source} not found: run `make data` first, or give a .jsonl of {{\"text\": ...}} rows")
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()[:300]]
    print(build_family(sys.argv[1], Path(sys.argv[2]), texts))
