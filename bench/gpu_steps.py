"""The work of `make bench ARGS=gpu` (bench/gpu.py), done in child processes that bench/gpu.py starts
one at a time, each with a deadline, so that one failure or hang leaves the other steps measured:

    python bench/gpu_steps.py build SPEC OUT   # world data, tokenizers, random-weight models, long prompts
    python bench/gpu_steps.py chain SPEC OUT   # one shape's sub-steps (sft, rm, ppo, decode, grpo), in order

SPEC is the JSON bench/gpu.py writes (RLHF_ROOT is the scratch root); OUT the results, rewritten
after every sub-step so a kill keeps what finished. Each sub-step runs under its own SIGALRM
deadline, from clean CUDA peak counters: its wall time, peak allocated / reserved (and what was
allocated when it began) or its error.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 2 ** 30


class StepTimeout(BaseException):
    """A sub-step ran past its deadline (a BaseException: library code catching Exception lets it by)."""


@contextmanager
def deadline(seconds: float):
    """Raise StepTimeout in the main thread after ``seconds``."""
    def fire(signum, frame):
        raise StepTimeout(f"timed out after {seconds:.0f}s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cuda_peaks(start: float) -> dict:
    """Peak allocated / reserved GiB since the counters were reset (None without CUDA)."""
    if not torch.cuda.is_available():
        return {"peak_allocated": None, "peak_reserved": None, "start_allocated": None}
    return {"peak_allocated": torch.cuda.max_memory_allocated() / GiB,
            "peak_reserved": torch.cuda.max_memory_reserved() / GiB, "start_allocated": start / GiB}


def measured(name: str, fn, seconds: float, results: dict, out: Path, partial: dict | None = None) -> None:
    """Run ``fn()`` (a dict of figures) under a deadline from reset CUDA counters; record it in ``results``
    with its wall time and peaks, or its error (with ``partial``, what ``fn`` had measured by then), and
    rewrite ``out``."""
    gc.collect()
    start = 0.0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    t = time.perf_counter()
    try:
        with deadline(seconds):
            record = {"ok": True, **(fn() or {})}
    except (Exception, StepTimeout) as e:  # noqa: BLE001 - every failure is a result here
        traceback.print_exc()
        record = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[-400:]}",
                  **({"partial": partial} if partial else {})}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    record.update(wall_s=time.perf_counter() - t, **cuda_peaks(start))
    results[name] = record
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"[gpu-steps] {name}: {'ok' if record['ok'] else record['error']} ({record['wall_s']:.0f}s)", flush=True)


# --- build: data, models, prompts ---------------------------------------------------------


def build_model(shape: dict, corpus: list[str]) -> dict:
    """The family's tokenizer (tests/families.py) with a random-weight model of ``shape``'s sizes, built
    on the device in bf16 and saved as safetensors into ``shape['path']``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tests.families import build_family
    folder = build_family(shape["family"], Path(shape["path"]), corpus)
    tiny, tok = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    vocab = shape["vocab"] or -(-(len(tok) + 8) // 64) * 64  # tiny: the tokenizer's, with room for a pad
    ids = {k: getattr(tiny, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(tiny, k, None) is not None}
    config = AutoConfig.for_model(tiny.model_type, vocab_size=vocab, **shape["sizes"], **ids)
    config.architectures = tiny.architectures
    generation = GenerationConfig.from_pretrained(folder)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = generation
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"params": params, "vocab": vocab, "tokenizer_tokens": len(tok)}


def long_prompts(shape: dict, n: int, target: int, root: Path) -> dict:
    """``n`` world prompts, each after filler text of the world's corpus so that the prompt as the policy
    sees it (chat template included: Qwen's adds a system turn) is about ``target`` tokens, written as
    ``shape['prompts']``."""
    from omegaconf import OmegaConf

    from pipeline.models.loading import load_tokenizer
    fmt = load_tokenizer(shape["path"], OmegaConf.create({"chat_template": None, "trust_remote_code": False}))
    text = " ".join(json.loads(x)["text"] for x in (root / "data/world/pretrain.jsonl").read_text().splitlines()[:2000])
    filler = fmt.tokenizer(text, add_special_tokens=False)["input_ids"]
    questions = [json.loads(x)["prompt"] for x in (root / "data/world/ppo_prompts.jsonl").read_text().splitlines()[:n]]
    rows, lengths = [], []
    for i, q in enumerate(questions):
        room = max(0, target - len(fmt.prompt_ids([{"role": "user", "content": q}])) - 2)
        start = (i * 97) % max(1, len(filler) - room)
        prompt = (fmt.tokenizer.decode(filler[start:start + room]).strip() + "\n\n" + q) if room else q
        rows.append({"prompt": prompt})
        lengths.append(len(fmt.prompt_ids([{"role": "user", "content": prompt}])))
    Path(shape["prompts"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"prompt_tokens_max": max(lengths), "prompt_tokens_mean": sum(lengths) / len(lengths)}


def build(spec: dict, out: Path) -> None:
    results: dict = {}
    from stages import datagen
    from tests.conftest import compose_config
    root = Path(os.environ["RLHF_ROOT"])
    measured("datagen", lambda: {"files": len(datagen.run(compose_config("datagen")))}, spec["caps"]["datagen"],
             results, out)
    corpus = [json.loads(x)["text"] for x in (root / "data/world/pretrain.jsonl").read_text().splitlines()[:300]]
    for name, shape in spec["shapes"].items():
        measured(f"build {name}", lambda: {**build_model(shape, corpus),
                                           **long_prompts(shape, spec["prompts"], spec["prompt_tokens"], root)},
                 spec["caps"]["build"], results, out)


# --- chain: the stages on one shape ---------------------------------------------------------


def stage_run(stage: str, overrides: list[str]) -> tuple[dict, object]:
    """``stages.<stage>.run`` on the config composed as its command line would compose it."""
    import importlib

    from tests.conftest import compose_config
    cfg = compose_config(stage, overrides)
    return importlib.import_module(f"stages.{stage}").run(cfg), cfg


def predicted(stage: str, cfg, prompt: int) -> float:
    """The memory model's peak (GiB) for ``stage`` (sft, rm, or the RL stage) as ``cfg`` configures it."""
    from pipeline.core.artifacts import find_parent
    from pipeline.plan.arch import read_arch
    from pipeline.plan.memory import breakdown
    from pipeline.plan.settings import adapter_ranks, settings
    rl = stage not in ("sft", "rm")
    ranks = adapter_ranks(find_parent(cfg.paths.run_dir, "sft"), find_parent(cfg.paths.run_dir, "rm")) if rl else None
    s = settings("ppo" if rl else stage, cfg, on_gpu=torch.cuda.is_available(), prompt=prompt, ranks=ranks)
    return breakdown(s.stage, read_arch(cfg.model.path), **s.kw)["peak"] / GiB


def train_stage(stage: str, spec: dict) -> dict:
    """sft / rm / ppo / grpo on the shape: the memory model's prediction beside the run's metrics, and
    for the RL stage the speed figures of its history (bench/ppo.py history_figures)."""
    from bench.ppo import history_figures
    name = "ppo" if stage == "grpo" else stage
    metrics, cfg = stage_run(name, spec["overrides"][stage])
    figures = {"predicted": predicted(stage, cfg, spec["prompt_tokens_max"])}
    if name == "ppo":
        path = Path(cfg.paths.run_dir) / cfg.algorithm.name / "history.jsonl"
        figures.update(history_figures(path, cfg.ppo.rollout_batch_size), updates=int(metrics["updates"]))
    return figures


def per_step_ms(fn, n1: int, n2: int) -> float:
    """ms per decode step of ``fn(n)`` (n new tokens), from two lengths so the prefill cancels out."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn(2)  # warm-up: kernels, allocator
    times = []
    for n in (n1, n2):
        sync()
        t = time.perf_counter()
        fn(n)
        sync()
        times.append(time.perf_counter() - t)
    return (times[1] - times[0]) / (n2 - n1) * 1e3


def copy_bandwidth(device: torch.device, size: int) -> float:
    """Device-to-device copy bandwidth, bytes/s counting the read and the write of each byte."""
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * size * 10 / (time.perf_counter() - t)


def weight_bytes(peft, tied: bool) -> tuple[float, float]:
    """(bytes of the base weights a decode step reads, bytes of one LoRA adapter): every base weight
    once but the input embedding table of an untied model (a step gathers only its rows)."""
    base, lora, seen = 0, 0, set()
    embed = peft.get_input_embeddings().weight
    for name, p in peft.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if ".lora_" in name:
            lora += p.numel() * p.element_size() if ".policy." in name or name.endswith(".policy") else 0
        elif not (p is embed and not tied):
            base += p.numel() * p.element_size()
    return float(base), float(lora)


def decode_bench(spec: dict, partial: dict | None = None) -> dict:
    """ms per decode step at ``rows`` rows on the long prompts: our samplers on the policy with its LoRA
    (the eager loop, the static-cache steps and, on CUDA, those steps as CUDA graphs),
    ``generate`` on the same policy with a dynamic and a static cache, and without the adapter; and the
    bandwidth floor, (weights + KV cache read per step) / the measured copy bandwidth."""
    from omegaconf import OmegaConf

    from pipeline.core.artifacts import find_parent
    from pipeline.generation.decoding import encode_prompts
    from pipeline.models.reward import load_sft_tokenizer
    from pipeline.plan.arch import read_arch
    from pipeline.rl.rollout import sample
    from pipeline.rl.shared_model import SharedBaseActorCritic
    from pipeline.rl.static_sampler import StaticSampler
    from stages.ppo import accelerator_for
    from tests.conftest import compose_config
    d, cfg = spec["decode"], compose_config("ppo", spec["overrides"]["ppo"])
    acc = accelerator_for(cfg.ppo.precision)
    sft, rm = find_parent(cfg.paths.run_dir, "sft"), find_parent(cfg.paths.run_dir, "rm")
    fmt = load_sft_tokenizer(sft)
    model = SharedBaseActorCritic.from_artifacts(sft, rm, cfg.model, fmt, None).to(acc.device)
    prompts = Path(OmegaConf.select(cfg, "data.ppo_prompts")[0])
    rows = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    convs = [[{"role": "user", "content": p}] for p in rows[:d["rows"]]]
    q_ids, q_mask = (t.to(acc.device) for t in encode_prompts(fmt, convs))
    kw = dict(input_ids=q_ids, attention_mask=q_mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
              pad_token_id=fmt.pad_id, eos_token_id=list(fmt.stop_ids))
    out, arch = {}, read_arch(cfg.model.path)
    if partial is not None:  # what is timed so far stays in the results if the step runs out of time
        partial.update(ms=out, rows=len(convs), prompt_width=q_ids.shape[1], n1=d["n1"], n2=d["n2"])
    with model.sampling() as policy, acc.autocast():
        statics = {kind: StaticSampler(policy, fmt, len(convs), q_ids.shape[1], d["n2"], graphs=kind == "graphs")
                   for kind in (("static", "graphs") if acc.device.type == "cuda" else ("static",))}
        variants = {"ours (rollout.sample, policy LoRA)": lambda n: sample(policy, fmt, convs, 1.0, n),
                    **{f"ours, ppo.sampler={kind} (policy LoRA)": (lambda n, s=s: s.decode(q_ids, q_mask, 1.0, n))
                       for kind, s in statics.items()},
                    "generate, dynamic cache, policy LoRA": lambda n: policy.generate(
                        **kw, max_new_tokens=n, min_new_tokens=n),
                    # on CUDA, generate compiles the forward for a static cache unless told not to: minutes
                    # of compilation inside a 90 s step, and not what shared/notes/gpu.md measured
                    "generate, static cache (no compile), policy LoRA": lambda n: policy.generate(
                        **kw, max_new_tokens=n, min_new_tokens=n, cache_implementation="static",
                        disable_compile=True)}

        def no_adapter(n):
            with policy.disable_adapter():
                return policy.generate(**kw, max_new_tokens=n, min_new_tokens=n)
        variants["generate, dynamic cache, no adapter"] = no_adapter
        for label, fn in variants.items():
            try:
                out[label] = per_step_ms(fn, d["n1"], d["n2"])
            except Exception as e:  # noqa: BLE001 - one variant's failure is its result
                traceback.print_exc()
                out[label] = f"{type(e).__name__}: {str(e)[-200:]}"
        weights, adapter = weight_bytes(policy, arch.tied)
        agree = agreement(policy, fmt, convs, q_ids, q_mask, statics, d["n1"])
    act = 2 if next(model.peft.parameters()).dtype != torch.float32 else 4
    kv = len(convs) * (q_ids.shape[1] + (d["n1"] + d["n2"]) / 2) * arch.layers * 2 * arch.kv * act
    bandwidth = copy_bandwidth(acc.device, d["copy_bytes"])
    return {"ms": out, "rows": len(convs), "prompt_width": q_ids.shape[1], "n1": d["n1"], "n2": d["n2"],
            "weight_bytes": weights, "adapter_bytes": adapter, "kv_bytes": kv, "bandwidth": bandwidth,
            "floor_ms": (weights + kv) / bandwidth * 1e3, "agreement": agree}


def agreement(policy, fmt, convs, q_ids, q_mask, statics: dict, n: int) -> dict:
    """Do the samplers draw alike at this shape? On one block of uniforms, each against the one it stands
    in for: static against the eager loop, graphs against static. Per pair: the share of rows drawn
    identically and the largest log-prob gap on the tokens both drew."""
    from pipeline.rl.rollout import sample
    from pipeline.rl.static_sampler import uniforms
    try:
        u = uniforms(len(convs), n, q_ids.device)
        runs = {"eager": sample(policy, fmt, convs, 1.0, n, u=u)[2:]}
        runs.update({kind: s.decode(q_ids, q_mask, 1.0, n, u=u) for kind, s in statics.items()})
    except Exception as e:  # noqa: BLE001 - a failure here is the result
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e)[-200:]}"}
    out = {}
    for a, b in (("static", "eager"), ("graphs", "static")):
        if a in runs:
            (ta, ma, la), (tb, _, lb) = runs[a][:3], runs[b][:3]
            same = (ta == tb).all(1)
            both = same[:, None] & (ma > 0)
            out[f"{a} vs {b}"] = {"rows_equal": float(same.float().mean()),
                                  "max_logprob_gap": float((la - lb)[both].abs().max()) if both.any() else 0.0}
    return out


def chain(spec: dict, out: Path) -> None:
    """The shape's sub-steps in order, each under min(its cap, the time left before the child's deadline)."""
    results: dict = {}
    for step in spec["steps"]:
        left = spec["deadline"] - time.time() - 5
        if left < max(spec["min_s"], spec["min_share"] * spec["caps"][step]):
            results[step] = {"ok": False, "error": f"skipped: {left:.0f}s left of the budget", "wall_s": 0.0}
            out.write_text(json.dumps(results, indent=1) + "\n")
            continue
        partial: dict = {}
        fn = (lambda: decode_bench(spec, partial)) if step == "decode" else (lambda s=step: train_stage(s, spec))
        measured(step, fn, min(spec["caps"][step], left), results, out, partial)


if __name__ == "__main__":
    kind, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.get("threads", 2))
    {"build": build, "chain": chain}[kind](spec, Path(out_path))
