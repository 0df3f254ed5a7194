"""The README's memory table: what the RL stage holds for model (b) and 7-8B models.

    python bench/memory.py

The memory model itself lives in the library, pipeline/plan/memory.py (its docstring has the
formulas, for sft and rm too); ``make plan`` applies it to any model folder's config.json and a
card. Here: the RL stage's breakdown for three fixed shapes, LoRA r 16 on all linear layers, the
bench's shape for (b) and prompt 512 + response 256 tokens for the 7-8B rows. Those are GPU settings,
where ``ppo.sampler=auto`` samples with CUDA graphs and holds their KV cache all run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.plan.arch import Arch  # noqa: E402
from pipeline.plan.memory import GiB, ppo_breakdown  # noqa: E402

MODEL_B = Arch("model (b): random Llama, 32k vocab", 35.4e6, 6, 512, 1376, 512, 32000, True)
LLAMA3_8B = Arch("Llama-3-8B", 8.03e9, 32, 4096, 14336, 1024, 128256, False)
QWEN25_7B = Arch("Qwen2.5-7B", 7.62e9, 28, 3584, 18944, 512, 152064, False)


def row(a: Arch, label: str, **kw) -> str:
    b = ppo_breakdown(a, **kw)
    kv = b.get("kv cache (sampling)", b.get("kv cache (held)"))
    cells = " | ".join(f"{x / GiB:.2f}" for x in [b[k] for k in ("weights", "adapters", "optimizer", "activations",
                                                                 "logits")] + [kv, b["peak"]])
    return f"| {a.name} | {label} | {cells} |"


def main() -> None:
    print("| model | setting | weights | adapters | optimizer | activations | logits | KV cache | peak (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    shape = dict(r=16, prompt=32, response=24)
    print(row(MODEL_B, "fp32, micro 32, gen 64 (the bench, on CPU)", weight_bytes=4, act_bytes=4, micro=32,
              gen=64, checkpointing=False, device="cpu", **shape))
    long = dict(r=16, prompt=512, response=256)
    for arch in (LLAMA3_8B, QWEN25_7B):
        for label, wb, micro, gen, ckpt in (("bf16, micro 4, gen 16, checkpointing", 2, 4, 16, True),
                                            ("bf16, micro 4, gen 16", 2, 4, 16, False),
                                            ("4-bit, micro 8, gen 32, checkpointing", 0.5, 8, 32, True)):
            print(row(arch, label, weight_bytes=wb, act_bytes=2, micro=micro, gen=gen, checkpointing=ckpt,
                      held_cache=True, **long))


if __name__ == "__main__":
    main()
