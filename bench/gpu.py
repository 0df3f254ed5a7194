"""The GPU bench, run once on a lent card: `make bench ARGS=gpu` (there: `bash bench/gpu_run.sh`).

Random-weight models of two real shapes, built on the device in bf16 with their family's local
tokenizer (tests/families.py; the tiny tokenizers' ids are valid ids of the big vocabularies):

    llama8b  Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 kv heads, MLP 14336, vocab 128256, untied
    qwen05b  Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads, 2 kv heads, MLP 4864, vocab 151936, tied

and the embedded world's data (`stages.datagen`) in a scratch RLHF_ROOT. At the consumer shape
(LoRA r 16, gradient checkpointing, bf16; sft / rm batch 4 x accumulation 4 on world rows; the RL
stage rollout 16, generation 16, minibatch 8, micro 4, world prompts after filler text to ~530
tokens with the chat template, as the earlier H200 run had them, + 256 new tokens) it measures, into
bench/results/gpu-<device>.txt (and $OUT when set):

  - peak allocated / reserved CUDA memory of sft, rm, ppo and grpo, beside the memory model's
    prediction (pipeline/plan) and the ratio;
  - decode ms per step at 16 rows: our sampler (pipeline.rl.rollout.sample) on the policy with its
    LoRA, `generate` with a dynamic and a static cache, and the bandwidth floor (weights + KV cache
    read per step over the measured device copy bandwidth);
  - episodes/s of ppo and grpo with the split of an update (the stage's time/* history keys), and
    TRL 1.16's GRPOTrainer on the same prompts, group size, lengths, beta and LoRA
    (bench/trl_grpo_baseline.py; bench/.venv-trl116 when it exists, else this interpreter);
  - the commit, device, versions, and every step's wall time or error.

Every step runs in a child process (bench/gpu_steps.py) with its own timeout, in order of value,
within one time budget: a failed, killed or skipped step leaves the rest measured.

    make bench ARGS="gpu --dry-run"         # the same end to end at tiny shapes (CPU: a few minutes)
    bash bench/gpu_run.sh                   # on the GPU machine (wheels from bench/gpu_wheels.sh)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_report import report  # noqa: E402
from bench.grpo import K, SCALE_REWARDS, TRL, run_trl_spec  # noqa: E402
from bench.ppo import merged_for_trl, run_measured  # noqa: E402

LLAMA = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0)
QWEN = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=512)
# name -> family (tokenizer), conf/model, sizes, vocabulary (None: the tiny tokenizer's), RL updates (the
# first is warm-up), and how TRL gets its models: "merged" (the SFT policy and the RM merged into
# folders, bench/ppo.py merged_for_trl) or "linked" (the base's weights linked, the RM's shape with a
# fresh head: merging and saving 2 x 16 GB would take a minute of the card's time; weights do not
# change speed or memory).
SHAPES = {
    "real": {"llama8b": dict(family="llama3", conf="llama3", sizes=LLAMA, vocab=128256, updates=2, trl="linked",
                             cap=1.0),
             "qwen05b": dict(family="qwen2.5", conf="qwen2", sizes=QWEN, vocab=151936, updates=2, trl="merged",
                             cap=0.5)},
    "tiny": {"tiny-llama": dict(family="llama3", conf="llama3", sizes={**TINY, "tie_word_embeddings": False},
                                vocab=None, updates=2, trl="linked", cap=1.0),
             "tiny-qwen": dict(family="qwen2.5", conf="qwen2", sizes={**TINY, "tie_word_embeddings": True},
                               vocab=None, updates=2, trl="merged", cap=1.0)},
}
# The consumer shape; lengths and step counts per scale.
RL = dict(rollout=16, gen=16, minibatch=8, micro=4, epochs=2, kl_coef=0.2, lora_r=16, lora_alpha=32, lr=5e-4)
SCALE = {"real": dict(prompt_tokens=530, new_tokens=256, train_steps=2, decode=dict(rows=16, n1=8, n2=48,
                                                                                    copy_bytes=2 ** 30)),
         "tiny": dict(prompt_tokens=64, new_tokens=16, train_steps=2, decode=dict(rows=16, n1=4, n2=24,
                                                                                 copy_bytes=2 ** 26))}
# Seconds each step may take at most (real / tiny; times a shape's ``cap``), and the plan: steps in
# order of value, the 8B's memory and decode first, its grpo and TRL runs (the longest) last.
CAPS = {"real": dict(datagen=60, build=90, sft=60, rm=60, ppo=130, decode=90, grpo=110, trl=140),
        "tiny": dict(datagen=120, build=120, sft=150, rm=150, ppo=200, decode=150, grpo=200, trl=300)}
PLAN = [("build", None, None), ("chain", 0, ["sft", "rm", "ppo", "decode"]),
        ("chain", 1, ["sft", "rm", "ppo", "decode", "grpo"]), ("trl", 1, None), ("chain", 0, ["grpo"]),
        ("trl", 0, None)]
MIN_S, MIN_SHARE = 20, 0.4  # a step is skipped, not started, with less than max(MIN_S, MIN_SHARE x its caps) left
BUDGET = {"real": 450, "tiny": 1500}  # seconds for all steps: real, ~7.5 minutes of the card's time


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def versions() -> dict:
    """Commit (and whether the tree differs from it), device, and library versions of this interpreter."""
    import peft
    import transformers
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cuda = f", {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.1f} GiB, CUDA {torch.version.cuda}" \
        if torch.cuda.is_available() else ""
    return {"commit": (git("rev-parse", "--short", "HEAD") or "unknown") +
            (" (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""),
            "device": device_name() + cuda, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version, "peft": peft.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


# --- the specs the steps run on ---------------------------------------------------------------


def shapes_of(scale: str, work: Path) -> dict:
    return {name: {**s, "path": str(work / "models" / name), "prompts": str(work / "data" / f"prompts-{name}.jsonl")}
            for name, s in SHAPES[scale].items()}


def overrides(name: str, shape: dict, scale: str) -> dict[str, list[str]]:
    """Each stage's command-line overrides at the consumer shape."""
    sc = SCALE[scale]
    common = [f"model={shape['conf']}", f"model.path={shape['path']}", f"model.name={name}", f"run_name={name}",
              "logger=none", "resume=false"]
    train = [f"train.max_steps={sc['train_steps']}", "train.per_device_train_batch_size=4",
             "train.gradient_accumulation_steps=4", "train.gradient_checkpointing=true", "train.eval_steps=0",
             "train.logging_steps=1", f"lora.r={RL['lora_r']}", f"lora.alpha={RL['lora_alpha']}", "train.num_threads=2"]
    rl = ["reward.min_accuracy=0", "reward.sharpen.coef=0",  # TRL's objective: no sharpening term,
          "algorithm.entropy_coef=0",  # nor an entropy term
          "checkpoint_every=100000", "num_threads=2", "ppo.kl.controller=fixed",
          "algorithm.kl_coef=null",  # TRL's beta for every estimator (grpo's own default is another)
          f"ppo.kl.init_coef={RL['kl_coef']}", f"ppo.rollout_batch_size={RL['rollout']}",
          f"ppo.generation_batch_size={RL['gen']}", f"ppo.minibatch_size={RL['minibatch']}",
          f"ppo.micro_batch_size={RL['micro']}", f"ppo.ppo_epochs={RL['epochs']}",
          f"ppo.max_new_tokens={sc['new_tokens']}",
          "ppo.gradient_checkpointing=true", f"ppo.total_updates={shape['updates']}", f"ppo.learning_rate={RL['lr']}",
          "ppo.lr_schedule=constant", f"data.ppo_prompts=['{shape['prompts']}']"]
    return {"sft": common + train + ["data.sft.eval=[]", "samples.num_prompts=4", "samples.batch_size=4",
                                     "samples.decoding.max_new_tokens=8"],
            "rm": common + train, "ppo": common + rl, "grpo": common + rl + ["algorithm=grpo"]}


def child(kind: str, spec: dict, tag: str, work: Path, seconds: float) -> tuple[dict, str | None]:
    """bench/gpu_steps.py ``kind`` on ``spec`` as a process killed after ``seconds`` (+ 30 s of grace
    over the deadline it keeps itself); its results, and why it ended badly, if it did."""
    (work / f"{tag}.json").write_text(json.dumps(spec))
    out = work / f"{tag}-out.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "RLHF_ROOT": str(work), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    code, _ = run_measured([sys.executable, str(ROOT / "bench/gpu_steps.py"), kind, str(work / f"{tag}.json"),
                            str(out)], env, work / f"{tag}.log", seconds + 30)
    results = json.loads(out.read_text()) if out.is_file() else {}
    return results, None if code == 0 else f"process exit {code}{' (killed at its timeout)' if code == -9 else ''}" \
        f", see {work / f'{tag}.log'}"


def trl_inputs(name: str, shape: dict, work: Path) -> tuple[Path, Path]:
    """TRL's policy and reward folders: merged from the shape's SFT and RM, or the base's weights linked
    beside a config with the pad id and the SFT's tokenizer (see SHAPES)."""
    if shape["trl"] == "merged":
        return merged_for_trl(work, [f"model={shape['conf']}", f"model.path={shape['path']}", f"run_name={name}"],
                              f"gpu-{name}", run=name)
    from pipeline.models.reward import load_sft_tokenizer
    from pipeline.core.artifacts import find_parent
    out = work / f"trl-inputs-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in Path(shape["path"]).iterdir():
        if f.name.endswith((".safetensors", ".safetensors.index.json")):
            os.symlink(f, out / f.name)
    fmt = load_sft_tokenizer(find_parent(str(work / "artifacts" / name), "sft"))
    config = json.loads((Path(shape["path"]) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "pad_token_id": fmt.pad_id}, indent=1))
    fmt.save(out)
    return out, out


def trl_step(name: str, shape: dict, scale: str, work: Path, seconds: float) -> dict:
    """TRL 1.16's GRPOTrainer on the shape (bench/trl_grpo_baseline.py): its episodes/s, split and peaks."""
    t = time.perf_counter()
    policy, reward = trl_inputs(name, shape, work)
    stops = json.loads((policy / "generation_config.json").read_text())["eos_token_id"]
    venv = ROOT / "bench" / f".venv-trl{''.join(TRL.split('.')[:2])}" / "bin" / "python"
    python = venv if venv.exists() else Path(sys.executable)
    prompts = [json.loads(x)["prompt"] for x in Path(shape["prompts"]).read_text().splitlines()]
    out = work / f"trl-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"policy_dir": str(policy), "reward_dir": str(reward),
            "prompts": prompts[:RL["rollout"] // K * shape["updates"]],
            "rollout_batch_size": RL["rollout"], "samples_per_prompt": K, "scale_rewards": SCALE_REWARDS,
            "minibatch_size": RL["minibatch"],
            "micro_batch_size": RL["micro"], "ppo_epochs": RL["epochs"], "max_new_tokens": SCALE[scale]["new_tokens"],
            "lora_r": RL["lora_r"], "lora_alpha": RL["lora_alpha"], "lora_target": "all-linear",
            "kl_coef": RL["kl_coef"], "temperature": 1.0, "total_updates": shape["updates"], "warmup_updates": 1,
            "num_threads": 2, "seed": 0, "stop_token_ids": stops if isinstance(stops, list) else [stops],
            "learning_rate": RL["lr"], "output_dir": str(out / "trainer"), "dtype": "bfloat16",
            "gradient_checkpointing": True}
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if python == venv:
        env["PYTHONPATH"] = ""  # its own env only, as bench/grpo.py runs it
    left = seconds - (time.perf_counter() - t)
    result = run_trl_spec(python, spec, out, env, left)
    gib = lambda mb: None if mb is None else mb / 1024  # noqa: E731
    return {"ok": True, **{k: result[k] for k in ("episodes_per_s", "update_s", "sample_s", "score_s", "optimise_s",
                                                  "response_tokens", "timed_updates")},
            "peak_allocated": gib(result.get("peak_cuda_mb")),
            "peak_reserved": gib(result.get("peak_cuda_reserved_mb")),
            "python": str(python), "trl": result["versions"]["trl"]}


# --- the run ----------------------------------------------------------------------------------


def caps_for(scale: str, shape: dict | None) -> dict:
    """CAPS of the scale times the shape's ``cap`` factor."""
    return {k: v * (shape["cap"] if shape else 1.0) for k, v in CAPS[scale].items()}


def skipped(left: float) -> dict:
    return {"ok": False, "error": f"skipped: {left:.0f}s left of the budget", "wall_s": 0.0}


def run_step(kind: str, name: str | None, steps: list[str] | None, ctx: dict, seconds: float) -> str | None:
    """One step of PLAN within ``seconds``; its results go into ctx['results']; why it ended badly, if so."""
    shapes, sc, work, results = ctx["shapes"], SCALE[ctx["scale"]], ctx["work"], ctx["results"]
    caps = caps_for(ctx["scale"], shapes[name] if name else None)
    if kind == "build":
        spec = {"shapes": shapes, "prompts": RL["rollout"] * max(s["updates"] for s in shapes.values()) + 16,
                "prompt_tokens": sc["prompt_tokens"], "caps": caps}
        got, why = child("build", spec, "build", work, seconds)
        results["build"].update(got)
        return why
    if kind == "chain":
        built = results["build"].get(f"build {name}", {})
        spec = {"steps": steps, "overrides": overrides(name, shapes[name], ctx["scale"]), "decode": sc["decode"],
                "caps": caps, "deadline": time.time() + seconds, "min_s": MIN_S, "min_share": MIN_SHARE,
                "prompt_tokens_max": built.get("prompt_tokens_max", sc["prompt_tokens"])}
        got, why = child("chain", spec, f"chain-{name}-{steps[-1]}", work, seconds)
        results[name].update(got)
        for s in steps:
            results[name].setdefault(s, {"ok": False, "error": why or "no result", "wall_s": 0.0})
        return why
    t = time.perf_counter()
    try:
        results[name]["trl"] = trl_step(name, shapes[name], ctx["scale"], work, seconds)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded, the rest still runs
        results[name]["trl"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-400:]}"}
    results[name]["trl"]["wall_s"] = time.perf_counter() - t
    return None if results[name]["trl"]["ok"] else results[name]["trl"]["error"]


def run_plan(ctx: dict, budget: float, save) -> None:
    """Every step of PLAN in order within ``budget`` seconds, ``save()`` after each. A step is skipped
    when less than MIN_SHARE of its caps (or MIN_S) is left, else given min(its caps, what is left)."""
    names, end = list(ctx["shapes"]), time.time() + budget
    for kind, index, steps in PLAN:
        name = names[index] if index is not None else None
        caps = caps_for(ctx["scale"], ctx["shapes"][name] if name else None)
        want = caps["trl"] if kind == "trl" else caps["datagen"] + caps["build"] * len(names) if kind == "build" \
            else sum(caps[s] for s in steps)
        left = end - time.time()
        if left < max(MIN_S, MIN_SHARE * want):
            for s in steps or [kind]:
                ctx["results"][name or "build"][s] = skipped(left)
            continue
        print(f"[gpu] {kind} {name or ''} {steps or ''} (up to {min(want, left):.0f}s)", flush=True)
        why = run_step(kind, name, steps, ctx, min(want, left))
        if why:
            print(f"[gpu] {kind} {name or ''}: {why}", flush=True)
        save()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="make bench ARGS=gpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (the same as --shapes tiny)")
    parser.add_argument("--shapes", choices=("real", "tiny"), default=None,
                        help="real: the 8B and 0.5B shapes (default on CUDA); tiny: the CPU dry run (default without)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all steps (default real {BUDGET['real']}, tiny {BUDGET['tiny']})")
    parser.add_argument("--out", default=None, help="results file (default bench/results/gpu-<device>.txt)")
    parser.add_argument("--work", default=None, help="scratch folder (default bench/.work/gpu-<shapes>)")
    args = parser.parse_args(argv if argv is not None else [a for a in sys.argv[1:] if a != "gpu"])
    scale = "tiny" if args.dry_run else args.shapes or ("real" if torch.cuda.is_available() else "tiny")
    work = Path(args.work or ROOT / "bench" / ".work" / f"gpu-{scale}").resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    torch.set_num_threads(2)
    started, info = time.time(), versions()
    shapes = shapes_of(scale, work)
    ctx = {"scale": scale, "work": work, "shapes": shapes, "results": {"build": {}, **{n: {} for n in shapes}}}
    name = f"gpu-{slug(device_name())}" + ("" if scale == "real" else f"-{scale}") + ".txt"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / name

    def save() -> str:
        """The results file (and results.json, the logs) as they stand: a kill keeps what finished."""
        info["total_s"] = time.time() - started
        text = report(info, scale, ctx["results"], SHAPES[scale], RL, SCALE[scale], f"TRL {TRL}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        (work / "results.json").write_text(json.dumps({"info": info, "results": ctx["results"]}, indent=1))
        if os.environ.get("OUT"):
            copies = [(out, out.name), (work / "results.json", f"{out.stem}.json")]
            for f, to in copies + [(log, log.name) for log in work.glob("*.log")]:
                shutil.copy(f, Path(os.environ["OUT"]) / to)
        return text

    run_plan(ctx, args.budget or BUDGET[scale], save)
    print(save())
    print(f"[gpu] results in {out} ({info['total_s']:.0f}s)")
    return out


if __name__ == "__main__":
    main()
