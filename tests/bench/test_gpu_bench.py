"""bench/gpu.py, the one-shot GPU bench: its results file from made-up results (unit), and its dry run
end to end at tiny shapes on the CPU (slow: 87 s alone on 2 idle cores at 15f03ef), which must finish every
step and write every section with numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_report import NO_CUDA, SECTIONS, report

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
INFO = dict(date="2026-12-04", commit="abc1234", device="NVIDIA H200", python="3.12", torch="2.11", transformers="5.23",
            trl="1.16.0", peft="0.21.2", total_s=400.0)
SHAPE = dict(family="llama3", sizes=dict(hidden_size=4096, num_hidden_layers=32, tie_word_embeddings=False),
             vocab=128256, updates=2)
RL = dict(rollout=16, gen=16, minibatch=8, micro=4, epochs=2, kl_coef=0.2, lora_r=16, lora_alpha=32)
SCALE = dict(prompt_tokens=530, new_tokens=256, train_steps=2)


def section(text: str, header: str) -> str:
    """The text from ``header`` to the next section."""
    start = text.index(header)
    ends = [i for h in SECTIONS if (i := text.find(h, start + 1)) > start]
    return text[start:min(ends, default=len(text))]


def rows(block: str, first: str) -> list[list[str]]:
    """The cells of the table rows of ``block`` whose first cell is ``first``."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()
            if line.startswith(f"| {first} |")]


@pytest.mark.unit
def test_the_report_puts_measured_beside_predicted_and_says_what_failed():
    speed = dict(ok=True, episodes_per_s=0.5, update_s=32.0, sample_s=22.0, score_s=2.0, optimise_s=8.0,
                 response_tokens=256.0, peak_allocated=18.0, peak_reserved=19.0, wall_s=100.0)
    results = {"build": {"datagen": dict(ok=True, wall_s=4.0)},
               "llama8b": {"sft": dict(ok=True, predicted=15.84, peak_allocated=15.84, peak_reserved=16.0,
                                       start_allocated=0.0, wall_s=30.0),
                           "rm": dict(ok=False, error="StepTimeout: timed out after 60s", wall_s=60.0),
                           "ppo": dict(speed, predicted=18.0),
                           "grpo": dict(speed, predicted=17.0, episodes_per_s=0.6, peak_allocated=17.0),
                           "trl": dict(speed, episodes_per_s=0.3, peak_allocated=34.0, python="python3", trl="1.16.0"),
                           "decode": dict(ok=True, ms={"ours": 80.0, "generate": "RuntimeError: boom"}, rows=16,
                                          prompt_width=531, n1=8, n2=48, weight_bytes=15e9, adapter_bytes=0.17e9,
                                          kv_bytes=1.6e9, bandwidth=4e12, floor_ms=4.15, wall_s=30.0,
                                          agreement={"static vs eager": dict(rows_equal=1.0, max_logprob_gap=3e-6),
                                                     "graphs vs static": dict(rows_equal=0.9375,
                                                                              max_logprob_gap=0.02)})}}
    text = report(INFO, "real", results, {"llama8b": SHAPE}, RL, SCALE, "TRL 1.16.0")
    assert all(h in text for h in SECTIONS)
    memory = rows(section(text, "## Peak memory"), "llama8b")
    assert memory[0][1:] == ["sft", "15.84", "16.00", "0.0000", "15.84", "1.00"]
    assert memory[1][1:3] == ["rm", "-"]
    assert rows(section(text, "## Steps"), "llama8b")[1][3] == "StepTimeout: timed out after 60s"
    decode = rows(section(text, "## Decode"), "llama8b")
    assert decode[0][1:] == ["ours", "80.000", "19.3"] and decode[1][2] == "RuntimeError: boom"
    assert ("llama8b, the samplers on the same uniforms (8 new tokens): static vs eager: 100% of rows drawn alike, "
            "log-prob gap <= 3e-06; graphs vs static: 94% of rows drawn alike, log-prob gap <= 0.02") in text
    speed_block = section(text, "## Episodes per second")
    assert "ours grpo / TRL 1.16.0: 2.00x episodes/s, peak allocated 0.50x" in speed_block
    assert [r[2] for r in rows(speed_block, "llama8b")] == ["0.500", "0.600", "0.300"]


@pytest.mark.slow
def test_the_dry_run_measures_every_step_at_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.txt"
    done = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert all(h in text for h in SECTIONS)
    steps = [r for shape in ("build", "tiny-llama", "tiny-qwen") for r in rows(section(text, "## Steps"), shape)]
    assert len(steps) == 3 + 2 * 6 and all(r[3] == "ok" for r in steps), steps
    for shape in ("tiny-llama", "tiny-qwen"):
        memory = rows(section(text, "## Peak memory"), shape)
        assert [r[1] for r in memory] == ["sft", "rm", "ppo", "grpo"]
        assert all(r[2] == NO_CUDA and float(r[5]) > 0 for r in memory)  # predicted, in GiB
        decode = rows(section(text, "## Decode"), shape)
        assert len(decode) == 5 and all(NUMBER.match(r[2]) for r in decode)  # 6 on CUDA: graphs too
        assert f"{shape}, the samplers on the same uniforms (4 new tokens): static vs eager: 100% of rows drawn " \
               "alike" in text
        speed = rows(section(text, "## Episodes per second"), shape)
        assert len(speed) == 3 and all(NUMBER.match(c) for r in speed for c in r[2:8])
        assert float(speed[2][2]) > 0  # TRL's episodes/s


@pytest.mark.unit
def test_a_decode_step_that_ran_out_of_time_keeps_what_it_had_timed():
    results = {"build": {}, "llama8b": {"decode": dict(ok=False, error="StepTimeout: timed out after 90s",
                                                       partial=dict(ms={"ours (rollout.sample, policy LoRA)": 81.5},
                                                                    rows=16), wall_s=90.0)}}
    text = report(INFO, "real", results, {"llama8b": SHAPE}, RL, SCALE, "TRL 1.16.0")
    block = section(text, "## Decode")
    assert "llama8b: StepTimeout: timed out after 90s" in block
    assert "llama8b: timed before that: ours (rollout.sample, policy LoRA) 81.500 ms/step" in block


@pytest.mark.unit
def test_measured_records_the_partial_figures_of_a_failed_step(tmp_path):
    import json

    from bench.gpu_steps import measured

    def decode():
        partial["ms"] = {"ours": 80.0}
        raise RuntimeError("out of time")

    partial, results = {}, {}
    measured("decode", decode, 5, results, tmp_path / "out.json", partial)
    assert results["decode"]["ok"] is False and results["decode"]["partial"] == {"ms": {"ours": 80.0}}
    assert json.loads((tmp_path / "out.json").read_text())["decode"]["error"] == "RuntimeError: out of time"
