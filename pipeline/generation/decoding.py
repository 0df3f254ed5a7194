"""Text generation: decoding strategies, prompt encoding, batched ``generate``.

Every stage that samples text (SFT evaluation, PPO rollouts, the final comparison)
goes through this module, so a decoding strategy means the same thing everywhere.
The strategies are the ones from the lectures; each has a file in ``conf/decoding/``:

- **greedy** (``greedy.yaml``): take ``argmax_v p(v | x_<t)`` at every step.
  Deterministic, cheap, prone to repetition loops.
- **beam search** (``beam.yaml``, ``num_beams: 4``): keep the ``k`` most probable
  partial sequences by total log-probability and return the best finished one.
  Approximates ``argmax_y p(y | x)`` better than greedy; with ``k = 1`` it *is* greedy.
- **temperature sampling** (``sample.yaml``, ``temperature: 1.0``, no truncation):
  sample from ``softmax(logits / T)``. ``T = 1`` is the model's own distribution,
  which is what PPO rollouts need: the KL term and the importance ratios assume
  the samples come from exactly the policy being scored (Ziegler et al. 2019).
- **top-k** (``top_k.yaml``, ``top_k: 10`` at ``T = 1``): sample among the ``k``
  most probable tokens only, renormalised (Fan et al. 2018).
- **nucleus / top-p** (``top_p.yaml``, ``top_p: 0.9`` at ``T = 1``): sample among the
  smallest set of most probable tokens whose total probability reaches ``p``
  (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"). Unlike
  top-k, the set grows where the model is unsure and shrinks where it is confident.

``top_k: 0`` and ``top_p: 1.0`` mean "off". HF's own default is ``top_k = 50``, which
would silently truncate a plain sample, so :func:`generation_config` always sets both
explicitly (see shared/notes/ppo-checklist.md: truncation biases the KL). Generation stops at
any token of the chat format's stop set (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, eos).

Prompts are conversations (lists of ``{"role", "content"}``), formatted by the tokenizer's
own chat template (pipeline/data/chat.py).

Shapes: ``B`` prompts, ``P`` prompt tokens (left-padded), ``T`` new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from pipeline.core.errors import ConfigError
from pipeline.data.chat import ChatFormat, Message
from pipeline.generation.stops import stop_mask


@dataclass
class DecodingConfig:
    """One decoding strategy. No defaults here: the values live in ``conf/decoding/*.yaml``."""

    name: str
    do_sample: bool
    temperature: float  # only used when do_sample
    top_k: int  # 0 = off; only used when do_sample
    top_p: float  # 1.0 = off; only used when do_sample
    num_beams: int  # 1 = no beam search
    max_new_tokens: int


# --- decoding settings ----------------------------------------------------------------


def check_decoding(dec: DecodingConfig) -> None:
    """Fail early, with the fix, on settings HF would reject deep inside ``generate``."""
    problems = []
    if dec.num_beams < 1:
        problems.append(f"num_beams={dec.num_beams} must be >= 1 (1 = no beam search)")
    if dec.max_new_tokens < 1:
        problems.append(f"max_new_tokens={dec.max_new_tokens} must be >= 1")
    if dec.do_sample:
        if dec.temperature <= 0:
            problems.append(f"temperature={dec.temperature} must be > 0 when sampling "
                            "(for argmax decoding set do_sample=false instead)")
        if dec.top_k < 0:
            problems.append(f"top_k={dec.top_k} must be >= 0 (0 = off)")
        if not 0.0 < dec.top_p <= 1.0:
            problems.append(f"top_p={dec.top_p} must be in (0, 1] (1.0 = off)")
    if problems:
        raise ConfigError(f"decoding config '{dec.name}': " + "; ".join(problems))


def generation_config(dec: DecodingConfig, fmt: ChatFormat) -> GenerationConfig:
    """A fresh GenerationConfig that implements ``dec`` exactly, with the format's stop set.

    Every sampling-relevant key is set: HF fills any key left unset from the model's own
    generation config, and a hub ``generation_config.json`` (Qwen's ``repetition_penalty: 1.05``,
    ``top_k: 20``) must not change our distribution. The models the pipeline loads carry a fresh
    config too (pipeline/models/loading.py), so nothing else can leak in.
    """
    check_decoding(dec)
    settings: dict[str, Any] = dict(
        max_new_tokens=dec.max_new_tokens, do_sample=dec.do_sample, num_beams=dec.num_beams,
        use_cache=True,
        # Neutral values, not omissions: a penalty or a forced minimum length changes the
        # distribution the samples come from, and PPO's KL estimate assumes it did not.
        repetition_penalty=1.0, min_new_tokens=0, no_repeat_ngram_size=0,
    )
    if dec.do_sample:
        # Only when sampling: HF warns about warper settings under greedy/beam, where it
        # ignores them anyway. top_k=0 must be explicit, HF's default is 50.
        settings.update(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p)
    return fmt.generation_config(**settings)


# --- prompts in, ids out --------------------------------------------------------------


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as ``input_ids`` (B, P) and ``attention_mask`` (B, P), padded on the LEFT.

    Left padding puts every prompt's last token in the last column, so the new tokens of all
    rows start at the same position P and ``output[:, P:]`` is the response.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def encode_prompts(fmt: ChatFormat, prompts: list[list[Message]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format each conversation with the generation prompt and left-pad: (B, P) ids and mask."""
    return left_pad([fmt.prompt_ids(p) for p in prompts], fmt.pad_id)


def as_conversation(prompt: str | list[Message]) -> list[Message]:
    """A prompt given as text is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, dec: DecodingConfig,
                 fmt: ChatFormat, generator_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``dec`` from left-padded prompts; return only the new tokens.

    ``input_ids``, ``attention_mask``: (B, P). Returns ``response_ids`` (B, T) and
    ``response_mask`` (B, T) with T <= ``dec.max_new_tokens`` (HF stops once every row
    has finished). The mask is 1 through the first stop token and 0 after; rows that never
    stop are all ones (truncated at ``max_new_tokens``).

    ``generator_seed``: when given, the global torch RNG is seeded right before
    ``generate`` (HF samples from it), so the same seed reproduces the same sample.
    The model's train/eval mode is left as the caller set it.
    """
    config = generation_config(dec, fmt)
    device = model.device
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config)  # (B, P + T): prompt, then the new tokens
    response_ids = out[:, input_ids.shape[1]:]
    return response_ids, stop_mask(response_ids, torch.tensor(fmt.stop_ids, device=response_ids.device)).long()


def decode_responses(fmt: ChatFormat, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Text of each response up to, not including, its stop token; stripped.

    ``response_ids``, ``response_mask``: (B, T) as returned by :func:`generate_ids`.
    """
    texts = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        if kept and kept[-1] in fmt.stop_ids:
            kept = kept[:-1]
        texts.append(fmt.tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts


def generate(model, fmt: ChatFormat, prompts: list[list[Message]], dec: DecodingConfig, batch_size: int,
             seed: int | None) -> list[str]:
    """One response string per prompt, generated ``batch_size`` prompts at a time.

    ``seed`` seeds the RNG once, before the first batch; later batches continue the
    same random stream, so a whole call reproduces (for a fixed ``batch_size``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = encode_prompts(fmt, prompts[start:start + batch_size])
        response_ids, response_mask = generate_ids(
            model, input_ids, attention_mask, dec, fmt,
            generator_seed=seed if start == 0 else None)
        texts.extend(decode_responses(fmt, response_ids.cpu(), response_mask.cpu()))
    return texts
