"""The largest settings that fit a card, ``ppo.*_batch_size=auto``, and the refusal of what cannot fit.

    options(arch, s, room)       for the configured dtype and 4-bit, gradient checkpointing off and on:
                                 the largest micro-batch (and generation batch) whose peak fits ``room``
    resolve_auto(arch, s, room)  ppo.micro_batch_size / generation_batch_size = auto: the largest that
                                 fit ``room`` (a divisor of the minibatch, of the rollout batch); without
                                 a CUDA device (room None) the minibatch and the rollout batch
    check_fits(arch, s, card)    refuse, in one line, a configuration whose predicted peak is over the card
    fit_ppo(cfg, ...)            the RL stage's ppo settings, auto resolved and checked, before any weight loads
    fit_train(stage, cfg, base)  sft / rm: the same refusal, before any weight loads

Micro-batches only change how a batch is cut (gradients accumulate), so every candidate keeps the
batch per optimizer step: sft / rm suggestions pair the micro-batch with its gradient accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.core.errors import ConfigError
from pipeline.plan.arch import Arch, read_arch
from pipeline.plan.card import MARGIN, budget, cuda_memory, show_bytes, the_card
from pipeline.plan.memory import breakdown
from pipeline.plan.settings import KEYS, Settings, settings


@dataclass(frozen=True)
class Option:
    label: str  # "bf16, checkpointing", "4-bit"
    settings: Settings
    parts: dict[str, float]  # the memory model's breakdown
    overrides: str  # what to change from the configured settings ("" when nothing)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest(candidates: list[int], fits: Callable[[int], bool]) -> Optional[int]:
    return max((c for c in candidates if fits(c)), default=None)


def _fits(arch: Arch, s: Settings, room: float, **kw) -> bool:
    return breakdown(s.stage, arch, **{**s.kw, **kw})["peak"] <= room


def overrides(s: Settings, o: Settings) -> str:
    """The overrides that turn settings ``s`` into ``o``."""
    keys, out = KEYS[s.stage], []
    if o.four_bit != s.four_bit:
        out.append(f"model.load_in_4bit={str(o.four_bit).lower()}")
    if o.kw["checkpointing"] != s.kw["checkpointing"]:
        out.append(f"{keys['checkpointing']}={str(o.kw['checkpointing']).lower()}")
    if o.kw["micro"] != s.kw["micro"]:
        out.append(f"{keys['micro']}={o.kw['micro']}")
        if s.stage != "ppo":
            out.append(f"train.gradient_accumulation_steps={s.micro_of // o.kw['micro']}")
    if s.stage == "ppo" and o.kw["gen"] != s.kw["gen"]:
        out.append(f"{keys['gen']}={o.kw['gen']}")
    return " ".join(out)


def fit(arch: Arch, s: Settings, room: float, four_bit: bool, checkpointing: bool) -> Optional[Option]:
    """The largest micro-batch (and generation batch) that fit ``room`` bytes in this precision and
    checkpointing; None when even 1 does not."""
    weight, act = s.bytes_for(four_bit)
    t = s.with_(weight_bytes=weight, act_bytes=act, checkpointing=checkpointing)
    t = replace(t, four_bit=four_bit)
    # micro first (beside one response sampled at a time), then the largest generation batch beside
    # it: the static sampler's cache, held through training, makes the two share the room
    one = dict(micro=1, gen=1) if s.stage == "ppo" else dict(micro=1)
    micro = largest(divisors(s.micro_of), lambda m: _fits(arch, t, room, **{**one, "micro": m}))
    gen = largest(divisors(s.gen_of), lambda g: _fits(arch, t, room, micro=micro, gen=g)) \
        if s.stage == "ppo" and micro is not None else None
    if micro is None or (s.stage == "ppo" and gen is None):
        return None
    t = t.with_(micro=micro, **({"gen": gen} if s.stage == "ppo" else {}))
    return Option(s.label(four_bit, checkpointing), t, breakdown(s.stage, arch, **t.kw), overrides(s, t))


def options(arch: Arch, s: Settings, room: float) -> list[tuple[str, Optional[Option]]]:
    """(label, the largest fitting option or None) for the configured dtype then 4-bit, checkpointing
    off then on: cheapest in quality and time first."""
    combos = [(q, c) for q in (False, True) for c in (False, True)]
    return [(s.label(q, c), fit(arch, s, room, q, c)) for q, c in combos]


def resolve_auto(arch: Optional[Arch], s: Settings, room: Optional[float]) -> tuple[Settings, list[str]]:
    """ppo's ``auto`` micro and generation batches resolved, and a line saying what was chosen."""
    auto = [k for k in ("micro", "gen") if s.kw.get(k) == "auto"]
    if not auto:
        return s, []
    if room is None:
        chosen = {"micro": s.micro_of, "gen": s.gen_of}
        why = ("no CUDA device, so not fitted to GPU memory: the micro-batch is the minibatch and the "
               "generation batch the rollout batch")
    else:
        one = {k: 1 if s.kw[k] == "auto" else s.kw[k] for k in ("micro", "gen")}
        micro = one["micro"] if s.kw["micro"] != "auto" else \
            largest(divisors(s.micro_of), lambda m: _fits(arch, s, room, **{**one, "micro": m})) or 1
        chosen = {"micro": micro,
                  "gen": largest(divisors(s.gen_of), lambda g: _fits(arch, s, room, micro=micro, gen=g)) or 1}
        why = f"the largest that fit {show_bytes(room)}: the free GPU memory less {MARGIN:.0%} of the card"
    s = s.with_(**{k: chosen[k] for k in auto})
    return s, ["ppo: " + ", ".join(f"{KEYS['ppo'][k]}=auto -> {s.kw[k]}" for k in auto) + f" ({why})"]


def check_fits(arch: Arch, s: Settings, card: Optional[int], source: str) -> Optional[str]:
    """Raise ConfigError, in one line, when the predicted peak is over the card; a warning line when it
    is within the margin; None when it fits or there is no card."""
    if card is None:
        return None
    peak = breakdown(s.stage, arch, **s.kw)["peak"]
    if peak <= budget(card):
        return None
    found = [o for _, o in options(arch, s, budget(card)) if o is not None]
    if peak <= card:
        return (f"{s.stage}: the predicted peak {show_bytes(peak)} is within {MARGIN:.0%} of the card's "
                f"{show_bytes(card)} ({source}) and may run out of memory")
    if found:
        fix = "; or ".join(f"{o.overrides} ({show_bytes(o.parts['peak'])})" for o in found[:2])
        fix = f"settings that fit: {fix}"
    else:
        fix = (f"nothing fits: weights, adapters and optimizer alone take "
               f"{show_bytes(breakdown(s.stage, arch, **s.kw)['static'])}; use a smaller model or a larger card")
    raise ConfigError(f"{s.stage}: the predicted peak {show_bytes(peak)} does not fit the card's {show_bytes(card)} "
                      f"({source}); {fix} (`make plan` lists every option)")


def fit_ppo(cfg: DictConfig, base: str, prompt: int, ranks: tuple[int, int]) -> tuple[DictConfig, list[str]]:
    """The RL stage's ``ppo`` settings with ``auto`` resolved (on CUDA, the largest that fit the free
    memory less the margin, and within ``gpu_memory`` when set), and the lines to print; a configuration
    whose predicted peak is over the card (``gpu_memory``, else the CUDA device's) is refused. ``base``:
    the base model's folder or hub id, whose config.json is read only when there is something to fit."""
    card, source = the_card(cfg.gpu_memory)
    cuda = cuda_memory()
    s = settings("ppo", cfg, on_gpu=cuda is not None, prompt=prompt, ranks=ranks)
    arch = read_arch(base) if card is not None else None  # a CUDA device is a card too (the_card)
    room = None if cuda is None else min(cuda[0] - MARGIN * cuda[1], budget(card) if card else math.inf)
    s, notes = resolve_auto(arch, s, room)
    warning = check_fits(arch, s, card, source)
    ppo = OmegaConf.merge(cfg, {"ppo": {"micro_batch_size": s.kw["micro"],
                                        "generation_batch_size": s.kw["gen"]}}).ppo
    return ppo, notes + ([warning] if warning else [])


def fit_train(stage: str, cfg: DictConfig, base: str) -> Optional[str]:
    """sft and rm: refuse a configuration whose predicted peak is over the card (``gpu_memory``, else
    the CUDA device's) before any weight loads; a warning line when it is within the margin. Nothing to
    check (None) on a CPU without ``gpu_memory``. ``base``: the base model's folder or hub id."""
    card, source = the_card(cfg.gpu_memory)
    if card is None:
        return None
    return check_fits(read_arch(base), settings(stage, cfg, on_gpu=cuda_memory() is not None), card, source)
