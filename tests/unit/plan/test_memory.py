"""pipeline.plan.memory: each stage's bytes on a hand-sized decoder, worked out in the comments."""

import pytest

from pipeline.plan.arch import Arch, arch_of
from pipeline.plan.memory import GiB, folds, ppo_breakdown, rm_breakdown, sft_breakdown

pytestmark = pytest.mark.unit

# 2 layers, H 8, I 16, H_kv 4, V 32, tied: 1448 parameters; a rank-2 adapter has 512 (tests/unit/plan/test_arch.py).
TINY = arch_of("tiny", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=32, tied=True)
FP32 = dict(weight_bytes=4, act_bytes=4, r=2)


def test_sft_worked_example():
    b = sft_breakdown(TINY, **FP32, micro=2, length=4, checkpointing=False)
    # weights 1448 x 4 = 5792; adapter 512 x 4 = 2048; optimizer 3 x 2048 = 6144.
    # 8 tokens; a layer saves (10 H + 4 I) x 4 = (80 + 64) x 4 = 576 bytes a token: 8 x 2 x 576 = 9216.
    # logits: TRL's fused head holds one tile, min(8, 4096) x min(32, 32768) x 4 = 1024, and the hidden
    # states' fp32 gradient beside their copy, 8 x 8 x (4 + 4) = 512: 1536.
    assert {k: b[k] for k in ("weights", "adapters", "optimizer", "activations", "logits")} == \
        {"weights": 5792, "adapters": 2048, "optimizer": 6144, "activations": 9216, "logits": 1536}
    assert b["peak"] == 5792 + 2048 + 6144 + 9216 + 1536 == 24736
    # Checkpointing: each layer's input (8 x 4 bytes a layer) plus one layer recomputed: 8 x (2 x 32 + 576) = 5120.
    assert sft_breakdown(TINY, **FP32, micro=2, length=4, checkpointing=True)["activations"] == 5120


def test_rm_holds_pairs_and_no_lm_head():
    b = rm_breakdown(TINY, **FP32, micro=2, length=4, checkpointing=False)
    # 2 pairs = 4 sequences of 4 tokens: 16 tokens x 2 x 576 = 18432; one fp32 score a token: 64.
    # The adapter (2048) + the scalar head and its trained copy (2 x 8 x 4 = 64); optimizer 3 x (512 + 8) x 4.
    assert (b["activations"], b["logits"], b["adapters"], b["optimizer"]) == (18432, 64, 2112, 6240)
    assert b["weights"] == 5792  # tied: the one table stays as the input embedding
    untied = Arch("untied", TINY.params + 256, 2, 8, 16, 4, 32, False)
    # Untied, the classifier has no LM head: the same 5792, where the causal LM holds 256 x 4 more.
    assert rm_breakdown(untied, **FP32, micro=2, length=4, checkpointing=False)["weights"] == 5792
    assert sft_breakdown(untied, **FP32, micro=2, length=4, checkpointing=False)["weights"] == 5792 + 1024


def test_ppo_worked_example():
    kw = dict(**FP32, micro=2, gen=4, prompt=3, response=1, checkpointing=False)
    b = ppo_breakdown(TINY, **kw, fold="never")
    # four adapters 4 x 2048 = 8192; two trained: 2 x 512 x 4 x 3 = 12288. Training: 2 x (3 + 1) = 8 tokens,
    # 9216 of activations, logits 2 x min(2 x 1, 32M / 32) x 32 x 4 = 512. Sampling: KV cache
    # 4 x 4 tokens x 2 layers x 2 x 4 x 4 bytes = 1024, sampler 4 x 32 x (4 + 4 + 8 + 8) = 3072.
    assert (b["adapters"], b["optimizer"], b["activations"], b["logits"]) == (8192, 12288, 9216, 512)
    assert (b["kv cache (sampling)"], b["sampler"]) == (1024, 3072)
    assert b["peak"] == 5792 + 8192 + 12288 + max(9216 + 512, 1024 + 3072) == 36000
    # The static sampler's cache is held through training, at the prompt rounded up to 64 columns:
    # 4 x (64 + 1) x 2 layers x 2 x 4 x 4 bytes = 16640, static; sampling keeps the sampler's 3072.
    h = ppo_breakdown(TINY, **kw, fold="never", held_cache=True)
    assert h["kv cache (held)"] == 16640 and "kv cache (sampling)" not in h and h["sampling"] == 3072
    assert h["peak"] == 5792 + 8192 + 12288 + 16640 + max(9216 + 512, 3072) == 52640
    # fold auto: a rank-2 adapter is 512 / 1152 of the adapted weights (>= 10%), so each of the four roles
    # holds a folded copy of the 1152 linear weights: 4 x 1152 x 4 = 18432.
    assert ppo_breakdown(TINY, **kw, fold="auto")["folded"] == 18432
    # Without a critic: three adapters, one trained.
    c = ppo_breakdown(TINY, **kw, fold="never", critic=False)
    assert (c["adapters"], c["optimizer"]) == (3 * 2048, 6144)


def test_the_plan_folds_where_the_rl_stage_would():
    # The adapter's share of the adapted layers' parameters against FOLD_SHARE = 0.1, fp32 bases only.
    tiny = arch_of("tiny", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=32, tied=True)
    llama3 = arch_of("llama3", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                     tied=False)
    assert folds(tiny, 2)  # 512 / 1152 = 0.44
    assert not folds(tiny, 2, weight_bytes=2)  # a bf16 base is never folded under auto
    assert not folds(llama3, 16)  # 16 x 81920 x 32 / (218103808 x 32) = 0.006
    assert folds(llama3, 16, fold="always") and not folds(tiny, 2, fold="never")


def test_the_h200_measurements_are_where_the_model_says():
    # One H200, Llama-3-8B shape, bf16, LoRA r 16, gradient checkpointing (README): measured peaks
    # allocated sft 15.84 GiB, rm 15.00 GiB, ppo 18.65 GiB, at 67c8684 (LM-head chunks of 8M logits on
    # the GPU then, 32M now: the model said 18.07 then, 18.11 now; not yet measured again).
    llama3 = arch_of("llama3", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                     tied=False)
    bf16 = dict(weight_bytes=2, act_bytes=2, r=16, checkpointing=True)
    assert round(sft_breakdown(llama3, **bf16, micro=4, length=128)["peak"] / GiB, 2) == 15.84
    assert round(rm_breakdown(llama3, **bf16, micro=4, length=128)["peak"] / GiB, 2) == 15.04
    ppo = ppo_breakdown(llama3, **bf16, micro=4, gen=16, prompt=530, response=256)["peak"] / GiB
    assert round(ppo, 2) == 18.11 and 0.95 < ppo / 18.65 < 1  # 3% under
    # The chunk's share: 261 rows of 128256 logits, fp32, output and gradient.
    parts = ppo_breakdown(llama3, **bf16, micro=4, gen=16, prompt=530, response=256)
    assert parts["logits"] == 2 * (2 ** 25 // 128256) * 128256 * 4
    cpu = ppo_breakdown(llama3, **bf16, micro=4, gen=16, prompt=530, response=256, device="cpu")
    assert cpu["logits"] == 2 * (2 ** 23 // 128256) * 128256 * 4


def test_the_trl_tile_sizes_are_trls():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from pipeline.plan.memory import TRL_TOKEN_TILE, TRL_VOCAB_TILE
    assert (TRL_TOKEN_TILE, TRL_VOCAB_TILE) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)


def test_the_readme_table_is_unchanged(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main()
    out = capsys.readouterr().out
    readme = (path.parents[1] / "README.md").read_text()
    assert out.strip() in readme  # the README's table is this script's output, line for line
    # held KV cache (the CUDA-graph sampler): 16 x (512 + 256) x 32 layers x 2 x 1024 x 2 bytes = 1.5 GiB,
    # in the static part beside training: 14.96 + 0.62 + 0.94 + 1.50 + 1.31 + 0.25 = 19.58
    assert "| Llama-3-8B | bf16, micro 4, gen 16, checkpointing | 14.96 | 0.62 | 0.94 | 1.31 | 0.25 | 1.50 | 19.58 |" \
        in out
