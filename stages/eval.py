"""The final comparison: every policy stage of the run on held-out prompts, gold-judged.

Base, SFT and PPO (where the run has them) answer the same held-out prompts under
each decoding in ``decodings`` (greedy, and sampling at T = 1). The gold judge labels
every answer; the run's reward model scores it; sampled answers also get their KL to
the SFT policy. The report (``report.json``, ``report.md``, ``responses.jsonl`` and PNG
plots) lands in ``artifacts/<run>/eval/``; see ``pipeline/evaluation.py`` for the metrics.

    make eval
    make eval ARGS="max_prompts=100 logger=none"
    make eval ARGS="decodings.sample.temperature=0.7 +decoding@decodings.nucleus=top_p"
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.artifacts import (MANIFEST, PRODUCER, Artifact, ArtifactError, load_artifact,
                                recorded_parent, restore_interrupted_swap, stage_path, staged_artifact)
from pipeline.data import load_validated, prompt_row
from pipeline.evaluation import (Rollout, build_report, category_scores, flat_metrics,
                                 generate_rollout, plot_category_scores, plot_ppo_history,
                                 read_history, render_markdown, response_records, rollout_kl,
                                 stage_metrics, win_rates)
from pipeline.generation import check_decoding
from pipeline.judge import Task, judge_task, parse_prompt
from pipeline.policies import POLICY_STAGES, load_policy
from pipeline.reward import load_reward_model, score_conversations
from pipeline.runtime import PipelineError, output_run_dir, resolved, seed_everything, user_errors
from pipeline.tracking import start_tracking
from pipeline.world import World, WorldConfig, world_from_config


# --- the run's artifacts ----------------------------------------------------------------------


def optional_artifact(run_dir: str, stage: str) -> Optional[Artifact]:
    """The run's ``stage`` artifact, or None when it was never built. A corrupt one raises."""
    path = stage_path(run_dir, stage)
    restore_interrupted_swap(path)
    return load_artifact(path, stage) if (path / MANIFEST).is_file() else None


def eval_parent(run_dir: str) -> Optional[Artifact]:
    """The run's newest artifact (ppo, else rm, sft, base). Its manifest chain pins every
    artifact the report depends on, so `make pipeline` can tell when the report is stale."""
    for stage in ("ppo", "rm", "sft", "base"):
        if (art := optional_artifact(run_dir, stage)) is not None:
            return art
    return None


def find_policies(cfg: DictConfig) -> tuple[list[str], dict[str, str]]:
    """The stages of ``cfg.policies`` the run has, and a note for each one it lacks."""
    present, skipped = [], {}
    for stage in cfg.policies:
        if stage not in POLICY_STAGES:
            raise PipelineError(f"policies: {stage!r} is not a policy stage; "
                                f"use some of {list(POLICY_STAGES)}")
        if (stage == "base" and cfg.model.path) or optional_artifact(cfg.paths.run_dir, stage) is not None:
            present.append(stage)
        else:
            where = stage_path(cfg.paths.run_dir, stage)
            skipped[stage] = f"no artifact at {where} (`{PRODUCER[stage]}` builds it)"
            print(f"eval: skip {stage}: {skipped[stage]}")
    if "base" not in present and "sft" not in present:
        raise PipelineError(f"nothing to evaluate in {cfg.paths.run_dir}: it has neither a base nor "
                            "an sft policy. Run `make base` and `make sft` first (same run_name).")
    return present, skipped


def load_tasks(cfg: DictConfig, world: World) -> tuple[list[str], list[Task]]:
    """The held-out prompts (the first ``max_prompts``) and the task the judge sees in each."""
    rows = load_validated(cfg.data.eval_prompts, cfg.data.hub_split, prompt_row)
    if cfg.max_prompts is not None:
        if cfg.max_prompts < 1:
            raise PipelineError(f"max_prompts={cfg.max_prompts} must be >= 1 (null = all prompts)")
        rows = rows[:cfg.max_prompts]
    tasks = []
    for row in rows:
        try:
            task = parse_prompt(row["prompt"], world)
        except ValueError as e:
            raise PipelineError(f"{e}: the gold judge scores only the embedded world's prompts; "
                                "point data.eval_prompts at the files `make data` writes") from None
        if "category" in row and row["category"] != task.category:
            # The judge's world differs from the one that wrote the prompts: facts would be wrong.
            raise PipelineError(f"eval prompt {row['prompt']!r} is `{row['category']}` in the data but "
                                f"`{task.category}` in the judge's world: pass the world.* settings "
                                "`make data` ran with")
        tasks.append(task)
    return [r["prompt"] for r in rows], tasks


# --- per stage: generate, KL, RM ------------------------------------------------------------


def kl_to_sft(stage: str, policy, reference, rollout: Rollout, dec) -> Optional[float]:
    """Mean per-sequence KL(stage || sft) on the stage's samples (see pipeline/evaluation.py).

    None without an SFT policy, and for decodings whose samples do not come from
    ``softmax(logits / T)`` itself: argmax ones, and top-k / top-p truncation (the log-probs
    would not be those of the distribution sampled). Exactly 0 for SFT itself.
    """
    if not (dec.do_sample and dec.top_k == 0 and dec.top_p == 1.0) or reference is None:
        return None
    if stage == "sft":
        return 0.0
    (model, tokenizer), (ref_model, ref_tokenizer) = policy, reference
    if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        print(f"eval: {stage} and sft tokenize differently: no KL to sft")
        return None
    return rollout_kl(model, ref_model, rollout, dec.temperature).mean().item()


def reward_scores(cfg: DictConfig, prompts: list[str], texts: dict[str, dict[str, list[str]]]):
    """RM score of every response, ``[stage][decoding] -> list``; None when the run has no RM."""
    rm = optional_artifact(cfg.paths.run_dir, "rm")
    if rm is None:
        print(f"eval: no rm artifact at {stage_path(cfg.paths.run_dir, 'rm')}: rm_score skipped")
        return None
    try:
        sft = recorded_parent(rm)
    except ArtifactError as e:  # e.g. sft was retrained after rm: the RM no longer fits it
        print(f"eval: rm_score skipped: {e}")
        return None
    model, tokenizer = load_reward_model(rm, sft, cfg.model)
    return {s: {d: score_conversations(
                model, tokenizer,
                [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                 for p, r in zip(prompts, responses)],
                cfg.score_batch_size).tolist()
                for d, responses in by_dec.items()}
            for s, by_dec in texts.items()}


# --- outputs ------------------------------------------------------------------------------------


def save_plots(folder: Path, report: dict, history: Optional[Path]) -> list[str]:
    """Per decoding, gold score by category and stage; PPO's reward and KL when it ran."""
    names = []
    for dec in report["stages"][next(iter(report["stages"]))]:
        scores = {s: report["categories"][s][dec] for s in report["stages"]}
        plot_category_scores(scores, f"gold score by category ({dec})", folder / f"categories_{dec}.png")
        names.append(f"categories_{dec}.png")
    if history is not None:
        plot_ppo_history(read_history(history), folder / "ppo_history.png")
        names.append("ppo_history.png")
    return names


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def log_to_wandb(tracker, report: dict, folder: Path, plots: list[str], records: list[dict],
                 n_rows: int) -> None:
    """Metrics, the PNGs as images, and a table of side-by-side responses."""
    if not tracker.enabled:
        return
    import wandb

    tracker.log(flat_metrics(report))
    tracker.log({f"plots/{Path(name).stem}": wandb.Image(str(folder / name)) for name in plots})
    pairs = [(s, d) for s, by_dec in report["stages"].items() for d in by_dec]
    columns = ["prompt", "category"] + [f"{s}/{d} {k}" for s, d in pairs for k in ("response", "gold")]
    rows = [[r["prompt"], r["category"]]
            + [v for s, d in pairs
               for v in (r["responses"][s][d]["response"], r["responses"][s][d]["gold_score"])]
            for r in records[:n_rows]]
    tracker.table("responses", columns, rows)
    tracker.summary(flat_metrics(report))


# --- the stage --------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    started = time.time()
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.num_threads)

    # --- compose: which policies, which prompts, which world the judge knows ---
    for dec in cfg.decodings.values():
        check_decoding(dec)
    stages, skipped = find_policies(cfg)
    world = world_from_config(WorldConfig(**OmegaConf.to_container(cfg.world, resolve=True)))
    prompts, tasks = load_tasks(cfg, world)
    print(f"eval: {', '.join(stages)} on {len(prompts)} prompts x {', '.join(cfg.decodings)}")

    # --- load and generate: every policy under every decoding, KL to SFT on the samples ---
    reference = load_policy("sft", cfg) if "sft" in stages else None
    rollouts: dict[str, dict[str, Rollout]] = {}
    kls: dict[str, dict[str, Optional[float]]] = {}
    for stage in stages:
        t0 = time.time()
        policy = reference if stage == "sft" else load_policy(stage, cfg)
        rollouts[stage], kls[stage] = {}, {}
        for name, dec in cfg.decodings.items():
            rollouts[stage][name] = generate_rollout(*policy, prompts, dec, cfg.batch_size, cfg.seed)
            kls[stage][name] = kl_to_sft(stage, policy, reference, rollouts[stage][name], dec)
        print(f"eval: {stage} generated in {time.time() - t0:.1f}s")
        del policy

    # --- judge: the gold label of every response ---
    texts = {s: {d: r.texts for d, r in by_dec.items()} for s, by_dec in rollouts.items()}
    verdicts = {s: {d: [judge_task(t, x, world) for t, x in zip(tasks, xs)] for d, xs in by_dec.items()}
                for s, by_dec in texts.items()}
    scores = {s: {d: [v.score for v in vs] for d, vs in by_dec.items()} for s, by_dec in verdicts.items()}

    # --- score: the run's reward model, when it has one ---
    rm_scores = reward_scores(cfg, prompts, texts)

    # --- report ---
    metrics = {s: {d: stage_metrics(verdicts[s][d], rollouts[s][d],
                                    None if rm_scores is None else rm_scores[s][d], kls[s][d])
                   for d in cfg.decodings} for s in stages}
    categories = {s: {d: category_scores(vs) for d, vs in by_dec.items()} for s, by_dec in verdicts.items()}
    report = build_report(cfg.run_name, len(prompts), metrics, win_rates(scores), categories, skipped,
                          seconds=round(time.time() - started, 1))
    table = render_markdown(report)
    records = response_records(prompts, [t.category for t in tasks], texts, scores, rm_scores)

    # --- save: swapped into artifacts/<run>/eval only once every file is written ---
    history = stage_path(cfg.paths.run_dir, "ppo") / "history.jsonl"
    parent = eval_parent(cfg.paths.run_dir)
    with staged_artifact(output_run_dir(cfg), "eval", resolved(cfg), parent=parent) as art:
        (art.dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (art.dir / "report.md").write_text(table)
        write_jsonl(art.dir / "responses.jsonl", records)
        plots = save_plots(art.dir, report, history if "ppo" in stages and history.is_file() else None)
        art.metrics = flat_metrics(report)
    tracker = start_tracking(cfg, "eval")
    log_to_wandb(tracker, report, art.final, plots, records, cfg.logger.num_samples)
    tracker.finish()
    print(f"\n{table}\neval: {report['seconds']:.0f}s, report in {art.final}")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
