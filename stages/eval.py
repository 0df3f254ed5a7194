"""The final comparison: every policy stage of the run on held-out prompts, side by side.

Base, SFT, DPO and the RL stages (where the run has them) answer the same held-out prompts
under each decoding in ``decodings`` (greedy, and sampling at T = 1). On the embedded world's
prompts the gold judge labels every answer, and the report says per category how often the run's
RM orders two stages' answers as the judge does; on any other prompts the run's reward model is the
judge (mean score, RM win rates). Every answer gets its RM score and length, sampled answers
their KL to the SFT policy, and each stage its NLL on held-out pretraining text (the alignment
tax). The report (``report.json``, ``report.md``, ``responses.jsonl`` and PNG plots) lands in
``artifacts/<run>/eval/``; see ``pipeline/eval/`` for the metrics. ``judge=`` adds an independent
judge, a reward model the run did not train (pipeline/eval/judge.py); RL stages that kept snapshots
(``ppo.snapshot_every``) get their over-optimisation curve (pipeline/eval/curve.py).

    make eval
    make eval ARGS="max_prompts=100 logger=none"
    make eval ARGS="data.eval_prompts=[my_prompts.jsonl]"       # your prompts: RM-judged
    make eval ARGS="decodings.sample.temperature=0.7 +decoding@decodings.nucleus=top_p"
    make eval ARGS="judge=artifacts/other_seed/rm"              # or a reward model folder / hub id
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
from pipeline.core.artifacts import (
    MANIFEST,
    PRODUCER,
    RL_STAGES,
    Artifact,
    load_artifact,
    recorded_parent,
    restore_interrupted_swap,
    stage_path,
    staged_artifact,
)
from pipeline.core.errors import ArtifactError, ConfigError, PipelineError
from pipeline.core.runtime import output_run_dir, resolved, seed_everything, user_errors
from pipeline.core.tracking import start_tracking
from pipeline.core.validation import check_ranges
from pipeline.data.bad_rows import DataReport
from pipeline.data.layouts import load_validated, prompt_row, text_row
from pipeline.eval.curve import build_curves, sample_snapshots, stage_scores
from pipeline.eval.intervals import rate_intervals, win_rate_intervals
from pipeline.eval.judge import add_judge_scores, agreement_by_category, check_judge, judge_report, judge_scores
from pipeline.eval.metrics import category_scores, stage_metrics, win_rates
from pipeline.eval.plots import plot_category_scores, plot_curves, plot_rl_history, plot_stage_scores, read_history
from pipeline.eval.report import build_report, flat_metrics, render_markdown, response_records
from pipeline.eval.rollouts import Rollout, corpus_nll, generate_rollout, rollout_kl
from pipeline.generation.decoding import check_decoding
from pipeline.models.policies import POLICY_STAGES, load_policy
from pipeline.models.reward import load_reward_model, score_conversations
from pipeline.world.entities import World, WorldConfig, world_from_config
from pipeline.world.judge import judge_task, parse_prompt
from pipeline.world.vocabulary import Task

# --- the run's artifacts ----------------------------------------------------------------------


def optional_artifact(run_dir: str, stage: str) -> Optional[Artifact]:
    """The run's ``stage`` artifact, or None when it was never built. A corrupt one raises."""
    path = stage_path(run_dir, stage)
    restore_interrupted_swap(path)
    return load_artifact(path, stage) if (path / MANIFEST).is_file() else None


def eval_parent(run_dir: str) -> Optional[Artifact]:
    """The run's most recently finished artifact: the report is up to date only while it is the
    same one (rebuilding any stage, e.g. rloo after ppo, makes a newer one), so `make pipeline`
    can tell when the report is stale."""
    built = [art for stage in (*RL_STAGES, "dpo", "rm", "sft", "base")
             if (art := optional_artifact(run_dir, stage)) is not None]
    return max(built, key=lambda art: art.manifest["finished_at"], default=None)


def stale(art: Artifact) -> Optional[str]:
    """Why ``art`` no longer fits its run (an artifact up its chain was rebuilt since), or None."""
    try:
        while art is not None:
            art = recorded_parent(art)
    except ArtifactError as e:
        return str(e)
    return None


def find_policies(cfg: DictConfig) -> tuple[list[str], dict[str, str]]:
    """The stages of ``cfg.policies`` the run has, and a note for each one it lacks."""
    present, skipped = [], {}
    for stage in cfg.policies:
        if stage not in POLICY_STAGES:
            raise PipelineError(f"policies: {stage!r} is not a policy stage; "
                                f"use some of {list(POLICY_STAGES)}")
        art = None if stage == "base" and cfg.model.path else optional_artifact(cfg.paths.run_dir, stage)
        if art is not None and (why := stale(art)):
            print(f"eval: skip {stage}: {why}")
            skipped[stage] = why
        elif art is not None or (stage == "base" and cfg.model.path):
            present.append(stage)
        else:
            where = stage_path(cfg.paths.run_dir, stage)
            skipped[stage] = f"no artifact at {where} (`{PRODUCER[stage]}` builds it)"
    if "base" not in present and "sft" not in present:
        raise PipelineError(f"nothing to evaluate in {cfg.paths.run_dir}: it has neither a base nor "
                            "an sft policy. Run `make base` and `make sft` first (same run_name).")
    return present, skipped


PROMPT_SPLITS = {"eval": "eval_prompts", "val": "val_prompts"}  # `prompts` -> the data key it reads


def prompt_files(cfg: DictConfig) -> list[str]:
    """The files of the split ``prompts`` names: eval (figures are reported on) or val (settings chosen on)."""
    if cfg.prompts not in PROMPT_SPLITS:
        raise ConfigError(f"prompts={cfg.prompts!r} must be eval (data.eval_prompts: the prompts figures are "
                          "reported on) or val (data.val_prompts: the prompts settings are chosen on)")
    return list(cfg.data[PROMPT_SPLITS[cfg.prompts]])


def load_prompts(cfg: DictConfig, data: Optional[DataReport] = None) -> list[dict]:
    """The held-out prompt rows (the first ``max_prompts``), each with its ``messages``."""
    rows = load_validated(prompt_files(cfg), cfg.data.hub_split, prompt_row, cfg.data.columns, cfg.data.bad_rows,
                          data)
    return rows if cfg.max_prompts is None else rows[:cfg.max_prompts]


def world_tasks(rows: list[dict], world: World) -> Optional[list[Task]]:
    """The task the gold judge sees in each prompt, or None when the prompts are not (all) the
    embedded world's: the judge then stays out and the reward model compares the stages."""
    tasks = []
    for row in rows:
        if not isinstance(row["prompt"], str):
            return None
        try:
            task = parse_prompt(row["prompt"], world)
        except ValueError:
            return None
        if "category" in row and row["category"] != task.category:
            # The judge's world differs from the one that wrote the prompts: facts would be wrong.
            raise PipelineError(f"eval prompt {row['prompt']!r} is `{row['category']}` in the data but "
                                f"`{task.category}` in the judge's world: pass the world.* settings "
                                "`make data` ran with")
        tasks.append(task)
    return tasks


def held_out_texts(cfg: DictConfig, data: Optional[DataReport] = None) -> Optional[list[str]]:
    """The first ``nll_documents`` of ``data.pretrain_eval``; None when it is off."""
    if not cfg.data.pretrain_eval or cfg.nll_documents == 0:
        return None
    rows = load_validated([cfg.data.pretrain_eval], cfg.data.hub_split, text_row, cfg.data.columns,
                          cfg.data.bad_rows, data)
    return [r["text"] for r in rows[:cfg.nll_documents]]


# --- per stage: generate, KL, RM ------------------------------------------------------------


def kl_to_sft(stage: str, policy, reference, rollout: Rollout, dec) -> Optional[float]:
    """Mean per-sequence KL(stage || sft) on the stage's samples (see pipeline/eval/).

    None without an SFT policy, and for decodings whose samples do not come from
    ``softmax(logits / T)`` itself: argmax ones, and top-k / top-p truncation (the log-probs
    would not be those of the distribution sampled). Exactly 0 for SFT itself.
    """
    if not (dec.do_sample and dec.top_k == 0 and dec.top_p == 1.0) or reference is None:
        return None
    if stage == "sft":
        return 0.0
    (model, fmt), (ref_model, ref_fmt) = policy, reference
    if fmt.tokenizer.get_vocab() != ref_fmt.tokenizer.get_vocab():
        print(f"eval: {stage} and sft tokenize differently: no KL to sft")
        return None
    return rollout_kl(model, ref_model, rollout, dec.temperature).mean().item()


def reward_scores(cfg: DictConfig, prompts: list[list[dict]], texts: dict[str, dict[str, list[str]]]):
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
    model, fmt = load_reward_model(rm, sft, cfg.model)
    return {s: {d: score_conversations(model, fmt, prompts,
                                       [[{"role": "assistant", "content": r}] for r in responses],
                                       cfg.score_batch_size).tolist()
                for d, responses in by_dec.items()}
            for s, by_dec in texts.items()}


def rollout_health(cfg: DictConfig, stages: list[str]) -> dict[str, dict[str, float]]:
    """Each RL stage's rollout health, as its artifact summarised it (its last updates)."""
    out = {}
    for stage in stages:
        if stage in RL_STAGES:
            metrics = load_artifact(stage_path(cfg.paths.run_dir, stage), stage).metrics
            out[stage] = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("health/")}
    return out


# --- outputs ------------------------------------------------------------------------------------


def save_plots(folder: Path, report: dict, histories: dict[str, Path]) -> list[str]:
    """Per decoding, gold score by category and stage (the RM score by stage outside the world);
    each RL stage's reward and KL over its updates."""
    names = []
    for dec in report["stages"][next(iter(report["stages"]))]:
        if report["categories"] is not None:
            scores = {s: report["categories"][s][dec] for s in report["stages"]}
            plot_category_scores(scores, f"gold score by category ({dec})", folder / f"categories_{dec}.png")
            names.append(f"categories_{dec}.png")
        elif all(report["stages"][s][dec]["rm_score"] is not None for s in report["stages"]):
            scores = {s: report["stages"][s][dec]["rm_score"] for s in report["stages"]}
            plot_stage_scores(scores, f"RM score by stage ({dec})", folder / f"rm_scores_{dec}.png")
            names.append(f"rm_scores_{dec}.png")
    if histories:
        plot_rl_history({s: read_history(p) for s, p in histories.items()}, folder / "rl_history.png")
        names.append("rl_history.png")
    if report.get("curves"):
        plot_curves(report["curves"], folder / "overoptimisation.png")
        names.append("overoptimisation.png")
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
    score = "gold_score" if report["judge"] == "gold" else "rm_score"
    columns = ["prompt", "category"] + [f"{s}/{d} {k}" for s, d in pairs for k in ("response", score)]
    rows = [[str(r["prompt"]), r["category"]]
            + [v for s, d in pairs for v in (r["responses"][s][d]["response"], r["responses"][s][d][score])]
            for r in records[:n_rows]]
    tracker.table("responses", columns, rows)
    tracker.summary(flat_metrics(report))


# --- the stage --------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    started = time.time()
    check_ranges(cfg)
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.num_threads)

    # --- compose: which policies, which prompts, whether the world's judge applies ---
    for dec in cfg.decodings.values():
        check_decoding(dec)
    stages, skipped = find_policies(cfg)
    check_judge(cfg.judge)  # a judge= that names no model fails now, not after the sampling
    world = world_from_config(WorldConfig(**OmegaConf.to_container(cfg.world, resolve=True)))
    data = DataReport()  # bad rows skipped (data.bad_rows) and merged turns, by reason
    rows = load_prompts(cfg, data)
    tasks = world_tasks(rows, world)
    conversations = [r["messages"] for r in rows]
    nll_texts = held_out_texts(cfg, data)
    judge = "the gold judge" if tasks is not None else "the RM (not the embedded world's prompts)"
    print(f"eval: {', '.join(stages)} on {len(rows)} prompts x {', '.join(cfg.decodings)}, judged by {judge}")

    # --- load and generate: every policy under every decoding, KL to SFT on the samples ---
    reference = load_policy("sft", cfg) if "sft" in stages else None
    rollouts: dict[str, dict[str, Rollout]] = {}
    kls: dict[str, dict[str, Optional[float]]] = {}
    nlls: dict[str, Optional[float]] = {}
    for stage in stages:
        t0 = time.time()
        policy = reference if stage == "sft" else load_policy(stage, cfg)
        rollouts[stage], kls[stage] = {}, {}
        for name, dec in cfg.decodings.items():
            rollouts[stage][name] = generate_rollout(*policy, conversations, dec, cfg.batch_size, cfg.seed)
            kls[stage][name] = kl_to_sft(stage, policy, reference, rollouts[stage][name], dec)
        nlls[stage] = None if nll_texts is None else corpus_nll(*policy, nll_texts, cfg.nll_block_size,
                                                                 cfg.batch_size)
        print(f"eval: {stage} generated in {time.time() - t0:.1f}s")
        del policy
    snapshots = sample_snapshots(cfg, stages, conversations, reference)  # ppo.snapshot_every's policies, T = 1

    # --- judge: the gold label of every response (world prompts only), and the RM's score ---
    texts = {s: {d: r.texts for d, r in by_dec.items()} for s, by_dec in rollouts.items()}
    verdicts = None if tasks is None else {
        s: {d: [judge_task(t, x, world) for t, x in zip(tasks, xs)] for d, xs in by_dec.items()}
        for s, by_dec in texts.items()}
    scores = None if verdicts is None else {
        s: {d: [v.score for v in vs] for d, vs in by_dec.items()} for s, by_dec in verdicts.items()}
    scored = {**texts, **snapshots.texts()}  # the snapshots' answers too: each scorer loads once
    all_rm = reward_scores(cfg, conversations, scored)
    rm_scores = stage_scores(all_rm, stages)
    if tasks is None and rm_scores is None:
        raise PipelineError("these prompts are not the embedded world's, so the gold judge cannot score them, "
                            f"and the run has no reward model at {stage_path(cfg.paths.run_dir, 'rm')}: "
                            "run `make rm` first (same run_name) to compare the stages with it")
    all_judge = judge_scores(cfg, conversations, scored)  # judge=: a reward model the run did not train
    judged = stage_scores(all_judge, stages)

    # --- report ---
    metrics = {s: {d: stage_metrics(None if verdicts is None else verdicts[s][d], rollouts[s][d],
                                    None if rm_scores is None else rm_scores[s][d], kls[s][d], nlls[s])
                   for d in cfg.decodings} for s in stages}
    categories = None if verdicts is None else {
        s: {d: category_scores(vs) for d, vs in by_dec.items()} for s, by_dec in verdicts.items()}
    intervals = {s: {d: rate_intervals(None if verdicts is None else verdicts[s][d], rollouts[s][d].ended.tolist())
                     for d in cfg.decodings} for s in stages}
    report = build_report(cfg.run_name, len(rows), metrics, None if scores is None else win_rates(scores),
                          None if rm_scores is None else win_rates(rm_scores), categories,
                          rollout_health(cfg, stages), skipped, seconds=round(time.time() - started, 1),
                          intervals=intervals, win_ci=None if scores is None else win_rate_intervals(scores),
                          rm_win_ci=None if rm_scores is None else win_rate_intervals(rm_scores))
    report["rm_agreement"] = (None if scores is None or rm_scores is None
                              else agreement_by_category(rm_scores, scores, [t.category for t in tasks]))
    report["split"] = cfg.prompts  # eval: figures to report; val: for choosing settings
    report["judge_model"] = judge_report(cfg.judge, judged, rm_scores, scores)  # None without judge=
    report["curves"] = build_curves(snapshots, all_rm, all_judge, scores, tasks, world)  # {} without snapshots
    title, rest = render_markdown(report).split("\n", 1)
    table = f"{title}\n\nPrompts: the {cfg.prompts} split (`data.{PROMPT_SPLITS[cfg.prompts]}`).\n{rest}"
    records = response_records([r["prompt"] for r in rows],
                               [t.category for t in tasks] if tasks else [r.get("category") for r in rows],
                               texts, scores, rm_scores)
    add_judge_scores(records, judged)

    # --- save: swapped into artifacts/<run>/eval only once every file is written ---
    histories = {s: stage_path(cfg.paths.run_dir, s) / "history.jsonl" for s in stages if s in RL_STAGES}
    parent = eval_parent(cfg.paths.run_dir)
    with staged_artifact(output_run_dir(cfg), "eval", resolved(cfg), parent=parent) as art:
        (art.dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (art.dir / "report.md").write_text(table)
        write_jsonl(art.dir / "responses.jsonl", records)
        plots = save_plots(art.dir, report, {s: p for s, p in histories.items() if p.is_file()})
        art.metrics = {**flat_metrics(report), **data.metrics()}
    tracker = start_tracking(cfg, "eval")
    log_to_wandb(tracker, report, art.final, plots, records, cfg.logger.num_samples)
    tracker.summary(data.metrics())
    tracker.log_artifact(art.artifact)
    tracker.finish()
    print(f"\n{table}\neval: {report['seconds']:.0f}s, report in {art.final}")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
