"""Conversations to token ids with a tokenizer's own chat template, and the tokens that end a turn.

Every stage formats through :class:`ChatFormat`, so SFT labels, RM and DPO pairs, PPO rollouts
and evaluation all see one conversation as the same ids (TRL's DPOTrainer is handed these ids
rather than tokenizing itself: pipeline/training/dpo.py).

**Masks without generation markers.** Real templates (ChatML, Llama 3, Mistral, Gemma) carry no
``{% generation %}`` markers, so the assistant tokens are found by rendering the conversation
prefix by prefix. For assistant turn ``i``::

    A_i = render(messages[:i], add_generation_prompt=True)   # what the model is prompted with
    B_i = render(messages[:i + 1])                            # ... plus its answer, closed

``B_i[len(A_i):]`` is the answer as the template writes it, through its end-of-turn token; what
the template writes after that token (ChatML's newline) belongs to the next turn. Rendering must
be prefix-consistent (``A_i`` a prefix of ``B_i``, ``B_i`` a prefix of the whole conversation);
a conversation that is not is refused.

**One encoding of the whole text.** The rendered conversation is tokenized once, as the
tokenizer itself (and so any server) encodes it, and the answer spans are mapped
to tokens through character offsets. Encoding the pieces one by one would not do: a
dummy-prefix normalizer (Mistral, Llama 2, SentencePiece in general) gives every piece its own
leading ``▁``, so ``[/INST]2 plus`` would train ``▁2`` where the tokenizer writes ``2``. A token
is supervised when any of its characters lies in an answer span, so every answer character and
the end-of-turn token are learned; a token that straddles the start of an answer (the template's
last characters fused with the answer's first) is supervised whole. The end-of-turn token is a
special token, split out before normalization, so the mask ends on it. Offsets need a fast
tokenizer (``tokenizer.json``); a slow one is refused when the format is built. A prompt's ids
(:meth:`ChatFormat.prompt_ids`) are the same encoding of the prompt text, the ids a rollout is
generated from; they start the conversation's ids unless a token straddles the prompt's end.

**Stop tokens.** The end-of-turn token the template closes an assistant turn with (found by
rendering a probe conversation), the tokenizer's eos, and the eos ids of the model's
``generation_config``. Sampling stops at any of them, and response masks, the missing-EOS
penalty and the RM's last-token read all use this one set. The pad token is never one of them:
a tokenizer without a pad token, or whose pad token is a stop token (Qwen2.5's
``<|endoftext|>``), gets a dedicated ``<|pad|>``, because a sequence classifier finds its last
real token by looking for padding.

**System turns.** Templates that refuse a ``system`` turn (Mistral, Gemma) get its text folded
into the first user turn, ``"<system>\\n\\n<user>"``, as those models' own docs advise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, GenerationConfig

from pipeline.core.errors import ConfigError

PAD = "<|pad|>"
DEFAULT_TEMPLATE = (Path(__file__).parent / "templates" / "chat.jinja").read_text()
_PROBE = "Probe7q"  # an answer no template rewrites (no whitespace for `| trim` to eat)

Message = dict[str, str]


class ChatTemplateError(ConfigError):
    """A chat template the pipeline cannot train with; the message names ``model.chat_template``."""


class ConversationError(ValueError):
    """One conversation the template refuses or renders inconsistently (a data error, not a config one)."""


def _template_fix(source: str) -> str:
    return (f"Fix: set model.chat_template=<path to a .jinja template> for {source} (the project's "
            f"default is pipeline/data/templates/chat.jinja).")


@dataclass(eq=False)
class ChatFormat:
    """A tokenizer plus what the pipeline derived from its template. Build with :func:`chat_format`."""

    tokenizer: Any
    stop_ids: tuple[int, ...]  # stop_ids[0]: the token that closes an assistant turn
    fold_system: bool  # the template refuses `system`: fold it into the first user turn
    bos_ids: tuple[int, ...]  # BOS the tokenizer adds on encode but the template does not write
    source: str = ""

    @property
    def end_of_turn_id(self) -> int:
        return self.stop_ids[0]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # --- rendering -------------------------------------------------------------------

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if self.fold_system:
            messages = fold_system_turn(messages)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise ConversationError(f"the chat template refuses this conversation: {e}") from None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- encoding ----------------------------------------------------------------------

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Ids a response is generated from: the conversation so far plus the generation prompt."""
        return list(self.bos_ids) + self._ids(self.render(messages, add_generation_prompt=True))

    def conversation(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """``(ids, mask)`` of a whole conversation; ``mask`` is 1 exactly on each assistant answer
        and the end-of-turn token that closes it (see the module docstring).

        ``ids`` is the tokenizer's own encoding of the rendered text (BOS first where the tokenizer
        adds one and the template does not write it), never the template pieces encoded apart."""
        full = self.render(messages, add_generation_prompt=False)
        spans = self._answer_spans(messages, full)
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        mask = span_mask(encoded["offset_mapping"], spans)
        return list(self.bos_ids) + encoded["input_ids"], [0] * len(self.bos_ids) + mask

    def _answer_spans(self, messages: list[Message], full: str) -> list[tuple[int, int]]:
        """``(start, end)`` characters of each answer in ``full``, through its end-of-turn token."""
        spans, at = [], 0
        eot = self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            with_answer = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (with_answer.startswith(before) and full.startswith(with_answer) and len(before) >= at):
                raise ConversationError(
                    f"the chat template does not render this conversation prefix-consistently at turn {i} "
                    "(an earlier turn is written differently once later turns follow), so the answer tokens "
                    "cannot be located")
            end = with_answer.find(eot, len(before))
            if end < 0:
                raise ConversationError(f"the chat template does not close assistant turn {i} with {eot!r}")
            spans.append((len(before), end + len(eot)))
            at = end + len(eot)
        return spans

    def scored_ids(self, prompt: list[Message], response: list[Message]) -> list[int]:
        """What a reward model reads: the prompt's ids, then the response through its last end-of-turn
        token, exactly the layout of a rollout (template text after the stop token is dropped)."""
        ids, mask = self.conversation(prompt + response)
        last = max(i for i, bit in enumerate(mask) if bit) if any(mask) else len(ids) - 1
        return ids[: last + 1]

    # --- stopping -------------------------------------------------------------------------

    def generation_config(self, **settings) -> GenerationConfig:
        """A fresh GenerationConfig with the stop set and pad id, plus exactly ``settings``: nothing
        from a hub ``generation_config.json`` (repetition penalty, ``min_new_tokens``, ...) gets in."""
        return GenerationConfig(eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id,
                                bos_token_id=self.tokenizer.bos_token_id, **settings)

    def save(self, folder: Path) -> None:
        """Tokenizer files plus a ``generation_config.json`` holding the stop set."""
        self.tokenizer.save_pretrained(folder)
        self.generation_config().save_pretrained(folder)


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters ``[s, e)`` overlap a span ``[a, b)``, else 0.

    Overlap, not containment: a token straddling a span's edge is supervised whole, because
    leaving it out would leave the answer's first characters never learned (the rule of
    transformers' own ``return_assistant_tokens_mask``). A token with an empty range (one a
    normalizer inserted) counts as the character it sits at."""
    return [int(any(s < b and max(e, s + 1) > a for a, b in spans)) for s, e in offsets]


# --- building a ChatFormat ----------------------------------------------------------------------


def fold_system_turn(messages: list[Message]) -> list[Message]:
    """``[system s, user u, ...] -> [user "s\\n\\nu", ...]`` for templates without a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def special_ids(tokenizer) -> frozenset[int]:
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return frozenset(set(tokenizer.all_special_ids) | added)


def _render(tokenizer, messages, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _accepts_system(tokenizer) -> bool:
    """Whether the template renders a system turn (and keeps its text) rather than refusing it."""
    probe = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "Hi"}]
    try:
        return _PROBE in _render(tokenizer, probe, True)
    except TemplateError:
        return False


def find_end_of_turn(tokenizer, source: str) -> int:
    """The special token the template writes right after an assistant answer."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        before, after = _render(tokenizer, probe[:1], True), _render(tokenizer, probe, False)
    except TemplateError as e:
        raise ChatTemplateError(f"model.chat_template: the template of {source} cannot render a user turn "
                                f"followed by an assistant turn ({e}). {_template_fix(source)}") from None
    at = after.find(_PROBE, len(before)) if after.startswith(before) else -1
    if at < 0:
        raise ChatTemplateError(
            f"model.chat_template: the template of {source} does not render a conversation prefix by prefix "
            "(the prompt with add_generation_prompt=True is not the start of the prompt plus its answer), so "
            f"assistant tokens cannot be located. {_template_fix(source)}")
    tail = after[at + len(_PROBE):]
    specials = special_ids(tokenizer)
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token in specials:
            return token
    raise ChatTemplateError(
        f"model.chat_template: the template of {source} ends an assistant turn with {tail!r}, which holds no "
        f"special token, so generation has nothing to stop on. {_template_fix(source)}")


def _ordered_unique(ids: Iterable[Optional[int]]) -> tuple[int, ...]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return tuple(out)


def _require_offsets(tokenizer, source: str) -> None:
    """Answer masks come from character offsets, which only fast (Rust) tokenizers give; refusing
    a slow one here beats a piecewise encoding that differs from the tokenizer's own."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{source}: the tokenizer is not a fast tokenizer, so it gives no character offsets and the "
            "answer tokens of a conversation cannot be located. Fix: point model.path at a model folder "
            "with a tokenizer.json, e.g. AutoTokenizer.from_pretrained(<model>, use_fast=True)"
            ".save_pretrained(<folder>) writes one.")


def chat_format(tokenizer, extra_stop_ids: Iterable[int] = (), source: str = "the model") -> ChatFormat:
    """Derive the stop set, system handling and BOS handling from a tokenizer that has its template
    and a pad token that is no stop token (see :func:`load_chat_format`)."""
    _require_offsets(tokenizer, source)
    fold = not _accepts_system(tokenizer)
    stops = _ordered_unique([find_end_of_turn(tokenizer, source), tokenizer.eos_token_id, *extra_stop_ids])
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stops:
        raise ValueError(f"{source}: the pad token must exist and be no stop token; load it with load_chat_format")
    probe = _render(tokenizer, [{"role": "user", "content": "Hi"}], True)
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("Hi")["input_ids"][:1] == [tokenizer.bos_token_id]
    bos_ids = (tokenizer.bos_token_id,) if adds_bos and not probe.startswith(bos) else ()
    return ChatFormat(tokenizer, stops, fold, bos_ids, source)


def set_template(tokenizer, template_path: Optional[str]) -> None:
    """``model.chat_template`` replaces the tokenizer's own template; a tokenizer with none (GPT-2)
    gets the project's default."""
    if template_path:
        path = Path(template_path)
        if not path.is_file():
            raise ChatTemplateError(f"model.chat_template={template_path}: no such file. Give the path of a "
                                    ".jinja chat template, or null to keep the tokenizer's own.")
        tokenizer.chat_template = path.read_text()
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_TEMPLATE


def load_chat_format(source: str, template_path: Optional[str], trust_remote_code: bool) -> ChatFormat:
    """The tokenizer of a model folder or hub id, ready for training and sampling.

    The stop set takes the eos ids of the model's ``generation_config.json`` when it has one. A
    missing pad token, or one that is a stop token, is replaced by a dedicated ``<|pad|>``.
    """
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    set_template(tokenizer, template_path)
    extra = _generation_config_eos(source, trust_remote_code)
    stops = {find_end_of_turn(tokenizer, source), tokenizer.eos_token_id, *extra}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stops:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return chat_format(tokenizer, extra, source)


def load_saved_chat_format(folder: Path) -> ChatFormat:
    """A ChatFormat saved by :meth:`ChatFormat.save` beside an adapter (tokenizer + stop set)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return chat_format(tokenizer, _generation_config_eos(str(folder), False), str(folder))


def _generation_config_eos(source: str, trust_remote_code: bool) -> list[int]:
    """The eos ids a model's ``generation_config.json`` lists ([] without one)."""
    try:
        eos = GenerationConfig.from_pretrained(source, trust_remote_code=trust_remote_code).eos_token_id
    except OSError:
        return []
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
