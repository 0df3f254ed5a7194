"""`make plan`'s table: each stage's predicted peak as configured, and the largest settings that fit the card."""

from __future__ import annotations

from typing import Optional

from pipeline.plan.arch import Arch
from pipeline.plan.card import MARGIN, budget, show_bytes
from pipeline.plan.fit import Option, options, resolve_auto
from pipeline.plan.memory import GiB, breakdown
from pipeline.plan.settings import Settings


def fits(peak: float, card: Optional[int]) -> str:
    """yes (within the budget), tight (over the budget, under the card), no, or - without a card."""
    if card is None:
        return "-"
    return "yes" if peak <= budget(card) else "tight" if peak <= card else "no"


def plan_stage(arch: Arch, s: Settings, card: Optional[int]) -> dict:
    """One stage's plan: ``auto`` resolved, the configured peak, and each fitting option (None: nothing fits)."""
    s, notes = resolve_auto(arch, s, budget(card) if card else None)
    parts = breakdown(s.stage, arch, **s.kw)
    return {"settings": s, "parts": parts, "peak": parts["peak"], "fits": fits(parts["peak"], card),
            "notes": notes, "options": options(arch, s, budget(card)) if card else []}


def _batch(s: Settings) -> tuple[str, str]:
    """The micro and generation cells: sft / rm ``micro x accumulation``, ppo ``micro`` and ``gen``."""
    if s.stage == "ppo":
        return str(s.kw["micro"]), str(s.kw["gen"])
    return f"{s.kw['micro']} x {s.micro_of // s.kw['micro']}", "-"


def _shape(s: Settings) -> str:
    if s.stage == "ppo":
        return f"prompt {s.kw['prompt']} + {s.kw['response']}"
    return f"length {s.kw['length']}" + (" (pairs)" if s.stage == "rm" else "")


def table(arch: Arch, source: str, card: Optional[int], card_source: str, plans: dict[str, dict]) -> str:
    """The plan as text: a header on the model and card, one markdown row per stage and option."""
    size = f"{arch.params / 1e9:.2f}B" if arch.params >= 1e9 else f"{arch.params / 1e6:.1f}M"
    lines = [f"plan for {arch.name} ({source}): {size} parameters, {arch.layers} layers, "
             f"hidden {arch.hidden}, MLP {arch.intermediate}, kv {arch.kv}, vocab {arch.vocab}, "
             f"{'tied' if arch.tied else 'untied'} LM head",
             f"card: {show_bytes(card)} ({card_source}); the options fill at most {show_bytes(budget(card))} "
             f"({MARGIN:.0%} kept free)" if card else
             f"card: none ({card_source}): give gpu_memory=24GiB (or run on a CUDA machine) to see what fits",
             "", "| stage | setting | micro | gen | peak GiB | fits | overrides |", "|---|---|---:|---:|---:|---|---|"]
    for stage, plan in plans.items():
        s: Settings = plan["settings"]
        micro, gen = _batch(s)
        lines.append(f"| {stage} | as configured: {s.label(s.four_bit, s.kw['checkpointing'])}, {_shape(s)} | "
                     f"{micro} | {gen} | {plan['peak'] / GiB:.2f} | {plan['fits']} | |")
        for label, o in plan["options"]:
            o: Optional[Option]
            if o is None:
                lines.append(f"| {stage} | {label} | - | - | - | no | |")
                continue
            micro, gen = _batch(o.settings)
            lines.append(f"| {stage} | {label} | {micro} | {gen} | {o.parts['peak'] / GiB:.2f} | yes | "
                         f"{o.overrides or '(as configured)'} |")
    notes = [n for plan in plans.values() for n in plan["notes"]]
    lines += ["", "micro: rows per forward pass x gradient accumulation steps (sft; rm: pairs), responses per "
                  "forward pass (ppo); gen: responses sampled at a time. 4-bit needs CUDA and bitsandbytes. "
                  "The memory model: pipeline/plan/memory.py.", *notes]
    return "\n".join(lines)
