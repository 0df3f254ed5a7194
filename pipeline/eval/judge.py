"""An independent judge: a reward model the run did not train scores every stage's responses.

Gao et al. (2023) call the reward a policy is optimised against the *proxy* and the one it is
judged by the *gold* reward. On the embedded world the gold judge is exact (pipeline/world/);
on any other prompts ``make eval ARGS="judge=<model>"`` brings a gold stand-in: a sequence
classifier with one output (``num_labels=1``) that was trained elsewhere. ``judge`` is

* a model folder or hub id: ``AutoModelForSequenceClassification`` from safetensors only, no
  remote code, and its own tokenizer and chat template; a checkpoint without the score head (a
  plain language model) is refused, since a fresh head scores at random;
* or an ``rm`` artifact of another run (e.g. another world seed), merged in memory (SFT
  backbone + RM adapter: ``pipeline.models.reward.standalone_reward_model``);
  ``save_standalone_reward_model`` writes the same as a plain folder.

The judge never sees the policy's token ids: each conversation (prompt messages plus the
response text) is re-rendered with the judge's template,
``tokenizer.apply_chat_template(messages, tokenize=False)``, and encoded by its tokenizer, BOS
added where the tokenizer adds one and the template does not write it. Templates that refuse a
system turn get it folded into the first user turn (as pipeline/data/chat.py does).

The report gives each stage's mean judge score, the judge's win rates against SFT (ties half,
95% bootstrap interval over prompts) and the agreement of the scorers (:func:`pairwise_agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from jinja2.exceptions import TemplateError

from pipeline.core.artifacts import MANIFEST, load_artifact
from pipeline.core.errors import PipelineError
from pipeline.data.chat import fold_system_turn
from pipeline.eval.intervals import win_rate_intervals
from pipeline.eval.metrics import win_rates

Scores = dict[str, dict[str, list[float]]]  # [stage][decoding] -> one score per prompt

# --- agreement of two scorers ---------------------------------------------------------------


def pairwise_agreement(a: dict[str, list[float]], b: dict[str, list[float]], eps: float = 1e-9
                       ) -> tuple[Optional[float], int]:
    """``(share, pairs)``: how often two scorers order two stages' responses to one prompt the same way.

    ``a[stage][i]`` and ``b[stage][i]``: the two scorers' scores of ``stage``'s response to prompt
    ``i`` (one decoding). Every prompt ``i`` and every two stages ``s, t`` make a pair; it counts
    when both scorers prefer one response (``|a_s - a_t| > eps`` and the same for b; a tie in either,
    identical responses included, leaves the pair out), and agrees when they prefer the same one::

        share = #{counted pairs with sign(a_s - a_t) == sign(b_s - b_t)} / #{counted pairs}

    0.5 is chance, 1 full agreement; None when no pair counts. E.g. stages x, y, z on 2 prompts,
    a = {x: [1, 0], y: [2, 0], z: [0, 5]}, b = {x: [3, 1], y: [4, 1], z: [5, 0]}: prompt 0 agrees
    on (x, y) only, prompt 1 leaves (x, y) out (a tie in a) and disagrees on the other two: 1 / 5.
    """
    stages = list(a)
    agree = counted = 0
    for i in range(len(a[stages[0]]) if stages else 0):
        for j, s in enumerate(stages):
            for t in stages[j + 1:]:
                da, db = a[s][i] - a[t][i], b[s][i] - b[t][i]
                if abs(da) > eps and abs(db) > eps:
                    counted += 1
                    agree += (da > 0) == (db > 0)
    return (agree / counted if counted else None), counted


def agreements(scorers: dict[str, Optional[Scores]]) -> dict[str, dict[str, dict]]:
    """``{"<x>_vs_<y>": {decoding: {"share", "pairs"}}}`` for every two scorers that are present
    (e.g. ``rm``, ``judge``, ``gold``), each over the same stages."""
    present = [(n, s) for n, s in scorers.items() if s is not None]
    out = {}
    for k, (x, sx) in enumerate(present):
        for y, sy in present[k + 1:]:
            decodings = next(iter(sx.values())).keys()
            out[f"{x}_vs_{y}"] = {
                d: dict(zip(("share", "pairs"), pairwise_agreement({s: sx[s][d] for s in sx},
                                                                   {s: sy[s][d] for s in sx})))
                for d in decodings}
    return out


def agreement_by_category(a: Scores, b: Scores, categories: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{category: {decoding: {"share", "pairs"}}}``: :func:`pairwise_agreement` of two scorers on
    each category's prompts alone, plus ``"all"`` over every prompt.

    ``a[stage][decoding][i]`` and ``b[...]`` score prompt ``i``, whose category is ``categories[i]``.
    It shows where a reward model is blind: on one seed-0 val eval the run's RM ordered sampled
    answers to harmful requests as the gold judge does 96% of the time and fact answers 64% (50% is
    chance), and RL cannot improve what its reward does not see. E.g. one decoding, stages x, y,
    categories [fact, harm], a = {x: [1, 0], y: [0, 1]}, b = {x: [0, 0], y: [1, 2]}: fact disagrees
    on its one pair (0 of 1), harm agrees (1 of 1), all 1 of 2.
    """
    decodings = list(next(iter(a.values())))
    out = {}
    for category in [*dict.fromkeys(categories), "all"]:
        keep = [i for i, c in enumerate(categories) if category in ("all", c)]
        out[category] = {d: dict(zip(("share", "pairs"), pairwise_agreement(
            {s: [a[s][d][i] for i in keep] for s in a}, {s: [b[s][d][i] for i in keep] for s in a})))
            for d in decodings}
    return out


# --- the judge model ------------------------------------------------------------------------------


@dataclass
class Judge:
    """A sequence classifier with its own tokenizer and chat template."""

    model: Any
    tokenizer: Any
    bos_ids: tuple[int, ...]  # BOS the tokenizer adds on encode and the template does not write
    source: str

    def render(self, prompt: list[dict], response: str) -> str:
        messages = list(prompt) + [{"role": "assistant", "content": response}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError:
            if messages[0]["role"] != "system":
                raise
            return self.tokenizer.apply_chat_template(fold_system_turn(messages), tokenize=False)

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        """The judge's own ids of the conversation, never the policy's."""
        return list(self.bos_ids) + self.tokenizer(self.render(prompt, response),
                                                   add_special_tokens=False)["input_ids"]


def _bos_ids(tokenizer) -> tuple[int, ...]:
    bos = tokenizer.bos_token
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    adds = bos is not None and tokenizer("Hi")["input_ids"][:1] == [tokenizer.bos_token_id]
    return (tokenizer.bos_token_id,) if adds and not probe.startswith(bos) else ()


def _load_classifier(source: str, model_cfg):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.models.loading import DTYPES

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, use_safetensors=True, trust_remote_code=False, dtype=DTYPES[model_cfg.dtype],
            output_loading_info=True)
    except (OSError, ValueError) as e:
        raise PipelineError(f"judge={source}: cannot load a sequence classifier from it ({e}). Give a reward "
                            "model folder or hub id with safetensors weights, or an rm artifact folder") from e
    if info.get("missing_keys"):
        raise PipelineError(f"judge={source} has no trained score head (missing {sorted(info['missing_keys'])[:3]}): "
                            "it is not a reward model, and a fresh head would score at random")
    return model, tokenizer


def check_judge(source: Optional[str]) -> None:
    """Refuse a ``judge=`` that names no loadable model before anything is sampled: an rm artifact is
    opened (checksums verified), a folder or hub id must have a ``config.json`` (no weights load)."""
    if source is None:
        return
    if (Path(source) / MANIFEST).is_file():
        load_artifact(source, "rm")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"judge={source}: no model folder, hub id or rm artifact of that name ({e}). Give "
                            "the folder or hub id of a reward model, or another run's artifacts/<run>/rm") from e


def load_judge(source: str, model_cfg) -> Judge:
    """The judge of ``judge=``: a classifier folder / hub id, or an ``rm`` artifact (see the module doc)."""
    if (Path(source) / MANIFEST).is_file():
        from pipeline.models.reward import standalone_reward_model

        model, fmt = standalone_reward_model(load_artifact(source, "rm"), model_cfg)
        tokenizer = fmt.tokenizer
    else:
        model, tokenizer = _load_classifier(source, model_cfg)
    if not tokenizer.chat_template:
        raise PipelineError(f"judge={source}: its tokenizer has no chat template, so conversations cannot be "
                            "rendered the way it was trained; give a reward model that ships one")
    if torch.cuda.is_available():
        model = model.to("cuda")
    return Judge(model.eval(), tokenizer, _bos_ids(tokenizer), source)


@torch.no_grad()
def classifier_scores(model, pad_id: Optional[int], sequences: list[list[int]], batch_size: int) -> list[float]:
    """The classifier's score of each sequence, read where the model itself reads it.

    HF's classifiers read the rightmost token that is not ``config.pad_token_id``. Batches are
    right-padded with ``pad_id`` when no sequence of the batch holds it; a sequence that does (a
    pad token that is also the eos the template writes) is scored alone with no pad id set, so the
    model reads its last token. Sequences are batched by length, so little is padding.
    """
    config = model.config.get_text_config()
    saved, out = config.pad_token_id, [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if pad_id is not None and not any(pad_id in sequences[i] for i in batch):
                width = max(len(sequences[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(batch):
                    ids[row, :len(sequences[i])], mask[row, :len(sequences[i])] = torch.tensor(sequences[i]), 1
                config.pad_token_id = pad_id
                logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
                for row, i in enumerate(batch):
                    out[i] = logits[row, 0].float().item()
            else:
                config.pad_token_id = None
                for i in batch:
                    out[i] = model(input_ids=torch.tensor([sequences[i]], device=model.device)).logits[0, 0].float().item()
    finally:
        config.pad_token_id = saved
    return out


def score_texts(judge: Judge, prompts: list[list[dict]], texts: dict[str, dict[str, list[str]]],
                batch_size: int) -> Scores:
    """The judge's score of every response, ``[stage][decoding] -> list`` in prompt order."""
    keys = [(s, d) for s, by_dec in texts.items() for d in by_dec]
    sequences = [judge.encode(p, r) for s, d in keys for p, r in zip(prompts, texts[s][d])]
    flat = classifier_scores(judge.model, judge.tokenizer.pad_token_id, sequences, batch_size)
    out: Scores = {s: {} for s in texts}
    for k, (s, d) in enumerate(keys):
        out[s][d] = flat[k * len(prompts):(k + 1) * len(prompts)]
    return out


def judge_scores(cfg, prompts: list[list[dict]], texts: dict[str, dict[str, list[str]]]) -> Optional[Scores]:
    """``score_texts`` with the judge of ``cfg.judge``; None without one (``judge: null``)."""
    if cfg.judge is None:
        return None
    print(f"eval: scoring every response with the judge {cfg.judge}")
    judge = load_judge(str(cfg.judge), cfg.model)
    return score_texts(judge, prompts, texts, cfg.score_batch_size)


# --- the report's section -------------------------------------------------------------------------


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def judge_report(source: Optional[str], judged: Optional[Scores], rm: Optional[Scores],
                 gold: Optional[Scores]) -> Optional[dict]:
    """``report.json``'s ``judge_model``: ``source``, ``scores.<stage>.<decoding>`` (mean judge score),
    ``win_rate`` / ``win_rate_ci`` of every stage against ``sft`` (``<stage>_vs_sft.<decoding>``; empty
    without SFT) and ``agreement`` of the scorers present (rm, judge, gold: :func:`agreements`).
    None without a judge."""
    if judged is None:
        return None
    vs_sft = {f"{s}_vs_sft" for s in judged if s != "sft"} if "sft" in judged else set()
    return {
        "source": source,
        "scores": {s: {d: _mean(v) for d, v in by_dec.items()} for s, by_dec in judged.items()},
        "win_rate": {k: v for k, v in win_rates(judged).items() if k in vs_sft},
        "win_rate_ci": {k: v for k, v in win_rate_intervals(judged).items() if k in vs_sft},
        "agreement": agreements({"rm": rm, "judge": judged, "gold": gold}),
    }


def add_judge_scores(records: list[dict], judged: Optional[Scores]) -> list[dict]:
    """``responses.jsonl`` rows with each response's ``judge_score`` (unchanged without a judge)."""
    if judged is not None:
        for i, record in enumerate(records):
            for s, by_dec in record["responses"].items():
                for d, cell in by_dec.items():
                    cell["judge_score"] = judged[s][d][i]
    return records
