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
would silently truncate a plain sample, so :func:`generation_kwargs` always passes
both explicitly (see shared/notes/ppo-checklist.md: truncation biases the KL).

Shapes: ``B`` prompts, ``P`` prompt tokens (left-padded), ``T`` new tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.runtime import ConfigError


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


def _special_ids(tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id), checking the project's rule that pad and eos are distinct tokens."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None or pad_id is None:
        raise ValueError(f"tokenizer needs both an eos and a pad token, has eos_token_id={eos_id}, "
                         f"pad_token_id={pad_id}; add a dedicated pad token "
                         "(tokenizer.add_special_tokens({'pad_token': '<|pad|>'}))")
    if eos_id == pad_id:
        # With pad == eos a real EOS is indistinguishable from padding (ppo-checklist.md).
        raise ValueError(f"tokenizer uses the same id {eos_id} for pad and eos; add a dedicated "
                         "pad token (tokenizer.add_special_tokens({'pad_token': '<|pad|>'}))")
    return eos_id, pad_id


def generation_kwargs(dec: DecodingConfig, tokenizer) -> dict[str, Any]:
    """Keyword arguments for HF ``model.generate`` that implement ``dec`` exactly.

    Explicit values override whatever the checkpoint's ``generation_config.json`` says
    (HF gives call kwargs the highest priority), so e.g. a Qwen checkpoint's
    ``repetition_penalty: 1.05`` or ``top_k: 20`` cannot leak into our decoding.
    """
    check_decoding(dec)
    eos_id, pad_id = _special_ids(tokenizer)
    kwargs: dict[str, Any] = {
        "max_new_tokens": dec.max_new_tokens,
        "do_sample": dec.do_sample,
        "num_beams": dec.num_beams,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        # Neutral values, not omissions: a penalty or a forced minimum length changes the
        # distribution the samples come from, and PPO's KL estimate assumes it did not.
        "repetition_penalty": 1.0,
        "min_length": 0,
    }
    if dec.do_sample:
        # Passed only when sampling: HF warns about warper settings under greedy/beam,
        # where it ignores them anyway. top_k=0 must be explicit, HF's default is 50.
        kwargs.update(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p)
    return kwargs


# --- prompts in, ids out --------------------------------------------------------------


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format each prompt as one user turn and tokenize with LEFT padding.

    Left padding puts every prompt's last token in the last column, so the new tokens
    of all rows start at the same position P and ``output[:, P:]`` is the response.

    Returns ``input_ids`` (B, P) and ``attention_mask`` (B, P), 0 on the padding.
    """
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=False)
             for p in prompts]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        # The template already holds every special token it wants; a BOS added here
        # would be a second one for tokenizers that put BOS in the template.
        enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    finally:
        tokenizer.padding_side = previous_side
    return enc["input_ids"], enc["attention_mask"]


def mask_after_first_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first ``eos_id`` of each row, 0 after it.

    ``ids`` (B, T) -> mask (B, T), long. Built from the position of the first EOS, never
    from pad ids: the mask must stay right even if a model emits the pad token.
    Example: ``[5, eos, 7, eos, pad] -> [1, 1, 0, 0, 0]``.
    """
    is_eos = (ids == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=-1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, dec: DecodingConfig,
                 tokenizer, generator_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``dec`` from left-padded prompts; return only the new tokens.

    ``input_ids``, ``attention_mask``: (B, P). Returns ``response_ids`` (B, T) and
    ``response_mask`` (B, T) with T <= ``dec.max_new_tokens`` (HF stops once every row
    has finished). The mask is 1 through the first EOS and 0 after; rows that never
    emit EOS are all ones (truncated at ``max_new_tokens``).

    ``generator_seed``: when given, the global torch RNG is seeded right before
    ``generate`` (HF samples from it), so the same seed reproduces the same sample.
    The model's train/eval mode is left as the caller set it.
    """
    kwargs = generation_kwargs(dec, tokenizer)
    device = model.device
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         **kwargs)  # (B, P + T): prompt, then the new tokens
    response_ids = out[:, input_ids.shape[1]:]
    return response_ids, mask_after_first_eos(response_ids, kwargs["eos_token_id"])


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Text of each response up to, not including, its first EOS; stripped.

    ``response_ids``, ``response_mask``: (B, T) as returned by :func:`generate_ids`.
    """
    eos_id = tokenizer.eos_token_id
    texts = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        if kept and kept[-1] == eos_id:
            kept = kept[:-1]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts


def generate(model, tokenizer, prompts: list[str], dec: DecodingConfig, batch_size: int,
             seed: int | None) -> list[str]:
    """One response string per prompt, generated ``batch_size`` prompts at a time.

    ``seed`` seeds the RNG once, before the first batch; later batches continue the
    same random stream, so a whole call reproduces (for a fixed ``batch_size``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = encode_prompts(tokenizer, prompts[start:start + batch_size])
        response_ids, response_mask = generate_ids(
            model, input_ids, attention_mask, dec, tokenizer,
            generator_seed=seed if start == 0 else None)
        texts.extend(decode_responses(tokenizer, response_ids.cpu(), response_mask.cpu()))
    return texts


# --- prompt files ---------------------------------------------------------------------


def _jsonl_prompt(path: Path, lineno: int, line: str) -> str:
    """The ``prompt`` field of one JSONL line, or a ValueError naming file, line and fix."""
    where = f"{path}:{lineno}"
    example = 'write one JSON object per line, e.g. {"prompt": "Where is the tower?"}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: bad JSON ({err.msg} at column {err.colno}); fix: {example}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}; fix: {example}")
    if "prompt" not in record:
        raise ValueError(f"{where}: missing field 'prompt' (keys: {sorted(record)}); "
                         f"fix: add a 'prompt' string field, e.g. {{\"prompt\": \"...\"}}")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: field 'prompt' is not a string (got {type(prompt).__name__}); "
                         "fix: make it a JSON string")
    if not prompt.strip():
        raise ValueError(f"{where}: field 'prompt' is empty; fix: give it text or delete the line")
    return prompt


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per non-empty line) or ``.jsonl`` (``{"prompt": ...}`` per line).

    Blank lines are skipped in both formats. Raises ValueError naming the file, the
    1-based line number, the problem and the fix for a malformed line, and for a file
    with no prompts at all.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: unsupported prompt file type '{suffix}'; "
                         "fix: use .txt (one prompt per line) or .jsonl (one {\"prompt\": ...} per line)")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            prompts.append(line.strip() if suffix == ".txt" else _jsonl_prompt(path, lineno, line))
    if not prompts:
        raise ValueError(f"{path}: no prompts found (file is empty or blank); "
                         "fix: add at least one prompt")
    return prompts
