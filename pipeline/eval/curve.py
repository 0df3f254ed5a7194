"""The over-optimisation curve: proxy and gold reward against the distance from the SFT policy.

Gao et al. (2023, "Scaling Laws for Reward Model Overoptimization") measure how far RL has
moved a policy by ``d = sqrt(KL(pi || pi_init))`` and plot, against ``d``, the proxy reward
(the RM the policy is trained on) and the gold reward (what the proxy stands in for): the proxy
keeps rising while the gold reward rises, peaks and falls. Here the points are the policy
snapshots an RL run keeps (``ppo.snapshot_every``, pipeline/rl/snapshots.py). ``make eval``
samples each snapshot on the eval prompts with the sampled decoding (``softmax(logits)`` at
T = 1, the policy's own distribution: the KL needs it) and per snapshot records

* ``kl``: the mean per-sequence k1 estimate of KL(snapshot || sft) on its samples
  (pipeline/eval/rollouts.py ``rollout_kl``), and ``sqrt_kl = sqrt(max(kl, 0))`` (a k1 mean
  can dip below 0 by noise near the start; the distance is then 0);
* ``proxy``: the mean score of the run's RM;
* ``gold``: the mean gold-judge score (the embedded world's prompts only), and ``judge``: the
  mean score of the independent judge (``judge=``, pipeline/eval/judge.py), each None where absent.

``origin`` is the SFT policy's point (update 0, KL 0) when SFT is evaluated; ``best`` names the
snapshot with the highest gold / judge score (the earliest on a tie).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from peft import PeftModel

from pipeline.core.artifacts import RL_STAGES, Artifact, find_parent
from pipeline.data.chat import load_saved_chat_format
from pipeline.eval.rollouts import generate_rollout, rollout_kl
from pipeline.models.loading import load_causal_lm
from pipeline.models.policies import adapter_dir, base_source_for
from pipeline.world.judge import judge_task


@dataclass
class SnapshotSample:
    """One snapshot's responses to every eval prompt, and their KL to SFT."""

    update: int
    texts: list[str]
    kl: float


@dataclass
class SnapshotRuns:
    """Every RL stage's snapshot samples, under the decoding named ``decoding``."""

    decoding: Optional[str]
    samples: dict[str, list[SnapshotSample]]

    def texts(self) -> dict[str, dict[str, list[str]]]:
        """``{"<stage>@<update>": {decoding: texts}}``: scored beside the stages' own responses."""
        return {snapshot_key(s, p.update): {self.decoding: p.texts} for s, ps in self.samples.items() for p in ps}


def snapshot_key(stage: str, update: int) -> str:
    return f"{stage}@{update}"


def stage_scores(scores: Optional[dict], stages: list[str]) -> Optional[dict]:
    """The evaluated stages' part of scores that also hold the snapshots' (None stays None)."""
    return None if scores is None else {s: scores[s] for s in stages}


# --- sampling the snapshots -------------------------------------------------------------------


def curve_decoding(decodings) -> Optional[str]:
    """The first decoding that samples ``softmax(logits)`` itself: T = 1, no top-k / top-p."""
    return next((name for name, d in decodings.items()
                 if d.do_sample and d.temperature == 1.0 and d.top_k == 0 and d.top_p == 1.0 and d.num_beams == 1),
                None)


def snapshots_of(art: Artifact) -> list[dict]:
    """The snapshots an RL artifact's manifest lists (``metrics.snapshots``), by update."""
    return sorted(art.metrics.get("snapshots") or [], key=lambda e: e["update"])


def load_snapshot(art: Artifact, entry: dict, model_cfg):
    """(model, chat format) of one snapshot: the base with the snapshot's adapter merged, eval mode."""
    fmt = load_saved_chat_format(adapter_dir(art))
    model = load_causal_lm(base_source_for(art), model_cfg, fmt)
    return PeftModel.from_pretrained(model, art.path / entry["path"]).merge_and_unload().eval(), fmt


def sample_snapshots(cfg, stages: list[str], prompts: list[list[dict]], reference) -> SnapshotRuns:
    """Sample every snapshot of the evaluated RL stages at T = 1 and take its KL to ``reference``
    (the SFT policy's ``(model, fmt)``). Empty when no stage kept snapshots, or with a note when
    there is no SFT policy or no T = 1 decoding to measure the KL with."""
    arts = {s: find_parent(cfg.paths.run_dir, s) for s in stages if s in RL_STAGES}
    runs = {s: snaps for s, art in arts.items() if (snaps := snapshots_of(art))}
    dec = curve_decoding(cfg.decodings)
    if runs and (reference is None or dec is None):
        why = "sft is not evaluated" if reference is None else "no decoding samples at T = 1 without truncation"
        print(f"eval: no over-optimisation curve for {', '.join(runs)}: {why} (the KL to SFT needs it)")
        runs = {}
    out: dict[str, list[SnapshotSample]] = {}
    for stage, entries in runs.items():
        art, out[stage] = arts[stage], []
        t0 = time.time()
        for entry in entries:
            model, fmt = load_snapshot(art, entry, cfg.model)
            rollout = generate_rollout(model, fmt, prompts, cfg.decodings[dec], cfg.batch_size, cfg.seed)
            kl = rollout_kl(model, reference[0], rollout, cfg.decodings[dec].temperature).mean().item()
            out[stage].append(SnapshotSample(entry["update"], rollout.texts, kl))
            del model
        print(f"eval: {stage}: {len(entries)} snapshots sampled in {time.time() - t0:.1f}s")
    return SnapshotRuns(dec, out)


# --- the curve --------------------------------------------------------------------------------


def sqrt_kl(kl: float) -> float:
    """Gao et al.'s distance from the initial policy, ``sqrt(KL)``; a (noisy) negative k1 mean is 0."""
    return math.sqrt(max(kl, 0.0))


def _mean(values: Optional[list[float]]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def curve_point(update: int, kl: float, proxy: Optional[list[float]], gold: Optional[list[float]],
                judge: Optional[list[float]]) -> dict:
    """One row of the curve from per-prompt scores: ``update, kl, sqrt_kl, proxy, gold, judge``."""
    return {"update": update, "kl": kl, "sqrt_kl": sqrt_kl(kl), "proxy": _mean(proxy), "gold": _mean(gold),
            "judge": _mean(judge)}


def best_points(points: list[dict]) -> dict[str, Optional[dict]]:
    """Per gold scorer (``gold``, ``judge``), the point scoring highest (the earliest of equals), as
    ``{"update", "score", "sqrt_kl"}``; None where no point has that score."""
    best = {}
    for key in ("gold", "judge"):
        scored = [p for p in points if p[key] is not None]
        top = max(scored, key=lambda p: (p[key], -p["update"]), default=None)
        best[key] = None if top is None else {"update": top["update"], "score": top[key], "sqrt_kl": top["sqrt_kl"]}
    return best


def build_curves(runs: SnapshotRuns, rm: Optional[dict], judge: Optional[dict], gold: Optional[dict],
                 tasks, world) -> dict:
    """``report.json``'s ``curves``: ``{stage: {"decoding", "points", "origin", "best"}}`` ({} without
    snapshots). ``rm`` / ``judge``: scores ``[key][decoding] -> list`` of the stages and the snapshots
    (:meth:`SnapshotRuns.texts` keys); ``gold``: the stages' gold scores; ``tasks``/``world``: the gold
    judge's, None outside the world."""
    dec = runs.decoding

    def scores(source: Optional[dict], key: str) -> Optional[list[float]]:
        return None if source is None or key not in source else source[key][dec]

    curves = {}
    for stage, samples in runs.samples.items():
        points = [curve_point(p.update, p.kl, scores(rm, snapshot_key(stage, p.update)),
                              None if tasks is None else [judge_task(t, x, world).score for t, x in zip(tasks, p.texts)],
                              scores(judge, snapshot_key(stage, p.update)))
                  for p in samples]
        origin = None
        if any(source is not None and "sft" in source for source in (rm, gold, judge)):
            origin = curve_point(0, 0.0, scores(rm, "sft"), scores(gold, "sft"), scores(judge, "sft"))
        curves[stage] = {"decoding": dec, "points": points, "origin": origin, "best": best_points(points)}
    return curves
