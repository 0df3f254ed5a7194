"""The results file of bench/gpu.py: markdown sections from its results (results[shape][step] records of
bench/gpu_steps.py and bench/gpu.py trl_step), one line or row per figure, "n/a (no CUDA)" for memory
on a machine without a CUDA device and the error for a step that failed."""

from __future__ import annotations

SECTIONS = ("## Steps", "## Peak memory", "## Decode", "## Episodes per second")
NO_CUDA = "n/a (no CUDA)"


def num(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def gib(x) -> str:
    """GiB with two decimals, four below 0.1 (the tiny shapes)."""
    return "-" if x is None else f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"


def mem(r: dict, key: str) -> str:
    """A peak in GiB; n/a without CUDA."""
    if not r.get("ok"):
        return "-"
    return NO_CUDA if r.get(key) is None else gib(r[key])


def status(r: dict) -> str:
    return "ok" if r.get("ok") else r.get("error", "no result")


def header(info: dict, scale: str, shapes: dict, rl: dict, sc: dict) -> list[str]:
    sizes = "; ".join(f"{n}: {s['family']} tokenizer, hidden {s['sizes']['hidden_size']}, "
                      f"{s['sizes']['num_hidden_layers']} layers, vocab {s['vocab'] or 'of the tokenizer'}, "
                      f"{'tied' if s['sizes']['tie_word_embeddings'] else 'untied'}, {s['updates']} RL updates "
                      "(1 warm-up)" for n, s in shapes.items())
    return [f"# bench/gpu.py ({scale} shapes), {info['date']}",
            f"commit {info['commit']}; device {info['device']}; python {info['python']}, torch {info['torch']}, "
            f"transformers {info['transformers']}, trl {info['trl']}, peft {info['peft']}; "
            f"{info['total_s']:.0f} s in all",
            f"shapes: {sizes}",
            f"settings: bf16 base, LoRA r {rl['lora_r']} (alpha {rl['lora_alpha']}) on all linear layers, gradient "
            f"checkpointing; sft / rm 4 x 4 world rows, {sc['train_steps']} steps; RL rollout {rl['rollout']}, "
            f"generation {rl['gen']}, minibatch {rl['minibatch']}, micro {rl['micro']}, {rl['epochs']} epochs, prompt "
            f"~{sc['prompt_tokens']} tokens with the chat template (filler text before a world prompt), "
            f"{sc['new_tokens']} new tokens, beta {rl['kl_coef']} fixed", ""]


def steps_section(results: dict) -> list[str]:
    lines = [SECTIONS[0], "", "| shape | step | wall s | result |", "|---|---|---:|---|"]
    for shape, steps in results.items():
        for step, r in steps.items():
            lines.append(f"| {shape} | {step} | {num(r.get('wall_s'), '.1f')} | {status(r)} |")
    return lines + [""]


def memory_section(results: dict, shapes: dict) -> list[str]:
    lines = [SECTIONS[1], "", "torch.cuda.max_memory_allocated / max_memory_reserved over each stage's run (model "
             "loading included; counters reset between stages), GiB; predicted: pipeline/plan/memory.py breakdown() "
             "for the stage's composed config (the RL stage at the longest prompt).", "",
             "| shape | stage | peak allocated | peak reserved | allocated at start | predicted | "
             "allocated / predicted |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for stage in ("sft", "rm", "ppo", "grpo"):
            r = results.get(shape, {}).get(stage, {})
            ratio = f"{r['peak_allocated'] / r['predicted']:.2f}" if r.get("ok") and r.get("peak_allocated") \
                else NO_CUDA if r.get("ok") else "-"
            lines.append(f"| {shape} | {stage} | {mem(r, 'peak_allocated')} | {mem(r, 'peak_reserved')} | "
                         f"{mem(r, 'start_allocated')} | {gib(r.get('predicted'))} | {ratio} |")
    return lines + [""]


def decode_section(results: dict, shapes: dict) -> list[str]:
    lines = [SECTIONS[2], "", "ms per decode step, from two lengths (n1, n2 new tokens) so the prefill cancels: "
             "(t(n2) - t(n1)) / (n2 - n1). Floor: (base weights read per step, the untied input embedding left "
             "out, + the KV cache at the mean position) / the measured device-to-device copy bandwidth (read + "
             "write bytes).", ""]
    for shape in shapes:
        r = results.get(shape, {}).get("decode", {})
        if not r.get("ok"):
            timed = r.get("partial", {}).get("ms", {})
            lines += [f"{shape}: {status(r)}"] + [f"{shape}: timed before that: {label} {num(ms, '.3f')} ms/step"
                                                  for label, ms in timed.items()] + [""]
            continue
        lines += [f"{shape}: {r['rows']} rows, prompt width {r['prompt_width']}, n1 {r['n1']}, n2 {r['n2']}; weights "
                  f"{r['weight_bytes'] / 1e9:.4g} GB + one LoRA adapter {r['adapter_bytes'] / 1e9:.4g} GB, KV cache "
                  f"{r['kv_bytes'] / 1e9:.4g} GB a step; copy bandwidth {r['bandwidth'] / 1e9:.1f} GB/s; floor "
                  f"{r['floor_ms']:.3f} ms", "", "| shape | variant | ms/step | x floor |", "|---|---|---:|---:|"]
        for label, ms in r["ms"].items():
            ok = isinstance(ms, (int, float))
            lines.append(f"| {shape} | {label} | {num(ms, '.3f')} | {ms / r['floor_ms']:.1f} |" if ok
                         else f"| {shape} | {label} | {ms} | - |")
        lines.append("")
        agree = r.get("agreement", {})
        if agree:
            lines += [f"{shape}, the samplers on the same uniforms ({r['n1']} new tokens): " + (agree["error"] if
                      "error" in agree else "; ".join(f"{pair}: {x['rows_equal']:.0%} of rows drawn alike, log-prob "
                                                      f"gap <= {x['max_logprob_gap']:.2g}" for pair, x in agree.items())), ""]
    return lines


def speed_section(results: dict, shapes: dict, trl_label: str) -> list[str]:
    lines = [SECTIONS[3], "", "Over the updates after the first (warm-up); ours from the stage's history.jsonl "
             "(time/loop an update, time/sample sampling, time/rollout - time/sample the scoring passes, time/update "
             f"the optimisation); {trl_label} from its on_step_end stamps and wrapped generation methods "
             "(bench/trl_grpo_baseline.py; its optimisation column holds the rest of its loop too). Peaks in GiB.", "",
             "| shape | run | episodes/s | update s | sampling s | scoring s | optimisation s | response tokens | "
             "peak allocated | peak reserved |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for shape in shapes:
        rs = results.get(shape, {})
        for key, label in (("ppo", "ours, ppo"), ("grpo", "ours, grpo"), ("trl", f"{trl_label} GRPOTrainer")):
            r = rs.get(key, {})
            if not r.get("ok"):
                lines.append(f"| {shape} | {label} | {status(r)} | | | | | | | |")
                continue
            lines.append(f"| {shape} | {label} | {r['episodes_per_s']:.3f} | {r['update_s']:.2f} | "
                         f"{r['sample_s']:.2f} | {r['score_s']:.2f} | {r['optimise_s']:.2f} | "
                         f"{r['response_tokens']:.1f} | "
                         f"{mem(r, 'peak_allocated')} | {mem(r, 'peak_reserved')} |")
        ours, trl = rs.get("grpo", {}), rs.get("trl", {})
        if ours.get("ok") and trl.get("ok"):
            memory = f", peak allocated {ours['peak_allocated'] / trl['peak_allocated']:.2f}x" \
                if ours.get("peak_allocated") and trl.get("peak_allocated") else ""
            ratios.append(f"{shape}: ours grpo / {trl_label}: {ours['episodes_per_s'] / trl['episodes_per_s']:.2f}x "
                          f"episodes/s{memory} (TRL ran in {trl['python']}, trl {trl['trl']})")
    return lines + [""] + ratios + [""]


def report(info: dict, scale: str, results: dict, shapes: dict, rl: dict, sc: dict, trl_label: str) -> str:
    """The whole results file."""
    return "\n".join(header(info, scale, shapes, rl, sc) + steps_section(results) + memory_section(results, shapes)
                     + decode_section(results, shapes) + speed_section(results, shapes, trl_label))
