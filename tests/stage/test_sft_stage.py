"""SFT stage: the real entry point on tiny models of several architectures."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import pipeline.models.loading
from pipeline.core.artifacts import load_artifact
from stages import sft
from tests.conftest import compose_config
from tests.stage.conftest import QUIET, TINY_SFT

pytestmark = pytest.mark.stage


@pytest.fixture
def spy_base(monkeypatch):
    """Record the base model SFT loads and a copy of its weights before training."""
    seen = {}
    real = pipeline.models.loading.load_causal_lm

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(sft, "load_causal_lm", recording)
    return seen


def assert_lora_trained_and_base_untouched(adapter_dir, seen):
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b, "no LoRA weights saved"
    # peft initialises B to zero, so any non-zero B was learned.
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    after = {n: p for n, p in seen["model"].named_parameters() if "lora_" not in n}
    base_names = {n.replace("base_model.model.", "").replace(".base_layer", "") for n in after}
    assert base_names == set(seen["before"])
    for name, p in after.items():
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), seen["before"][original]), f"base weight {original} changed"


def test_sft_trains_lora_and_leaves_base_bit_identical(run_root, spy_base):
    metrics = sft.run(compose_config("sft", TINY_SFT + QUIET))
    art = load_artifact(run_root / "artifacts" / "default" / "sft", "sft")
    assert_lora_trained_and_base_untouched(art.path / "adapter", spy_base)
    assert art.manifest["parent"]["stage"] == "base"
    for key in ("train_loss", "eval_loss", "eval_mean_token_accuracy", "samples/eos_rate"):
        assert key in art.metrics and art.metrics[key] == metrics[key]
    assert (art.path / "adapter" / "tokenizer.json").is_file()


def test_overrides_reach_the_adapter(run_root):
    sft.run(compose_config("sft", TINY_SFT + QUIET + ["lora.r=2", "lora.alpha=4",
                                                        "lora.target_modules=[q_proj,v_proj]"]))
    adapter = load_file(run_root / "artifacts/default/sft/adapter/adapter_model.safetensors")
    a = [v for k, v in adapter.items() if "lora_A" in k]
    assert {v.shape[0] for v in a} == {2}
    assert all(("q_proj" in k or "v_proj" in k) for k in adapter)


def test_save_merged_writes_a_full_model_equal_to_base_plus_adapter(run_root):
    from transformers import AutoModelForCausalLM

    from pipeline.models.policies import load_policy
    cfg = compose_config("sft", TINY_SFT + QUIET + ["save_merged=true"])
    sft.run(cfg)
    merged_dir = run_root / "artifacts/default/sft/merged"
    assert (merged_dir / "model.safetensors").is_file() and not list(merged_dir.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True).eval()
    with_adapter, fmt = load_policy("sft", cfg, merge=False)
    ids = fmt.tokenizer(["What is 2 plus 3?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_no_eval_split_trains_without_evaluation(run_root):
    metrics = sft.run(compose_config("sft", TINY_SFT + QUIET + ["data.sft.eval=[]"]))
    assert "eval_loss" not in metrics and metrics["train_loss"] > 0
    assert load_artifact(run_root / "artifacts/default/sft", "sft").metrics == metrics


def test_a_multirun_sweep_keeps_every_job(run_root, tmp_path):
    out = subprocess.run([sys.executable, "-m", "stages.sft", "-m", "seed=1,2", *TINY_SFT, *QUIET,
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         capture_output=True, text=True, env={**os.environ, "RLHF_ROOT": str(run_root)})
    assert out.returncode == 0, out.stderr[-2000:]
    # One artifact per job, in a folder named after the job's overrides.
    jobs = sorted((run_root / "artifacts/default/sweep").glob("*/sft"))
    assert len(jobs) == 2
    for seed, job in zip((1, 2), jobs):
        art = load_artifact(job, "sft")
        assert f"seed={seed}" in job.parent.name and art.manifest["config"]["seed"] == seed
        assert art.manifest["parent"]["stage"] == "base"
    assert not (run_root / "artifacts/default/sft").exists()  # the sweep left the run's own sft alone


def tiny_arch(name, tokenizer):
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, **common))
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, **common))
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=256, **common))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sft_runs_on_each_architecture(run_root, spy_base, arch, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(run_root / "artifacts/default/base/model")
    torch.manual_seed(0)
    local = tmp_path / f"tiny-{arch}"
    tiny_arch(arch, tokenizer).save_pretrained(local)
    tokenizer.save_pretrained(local)
    sft.run(compose_config("sft", TINY_SFT + QUIET + [f"model.path={local}", f"model.name=tiny-{arch}"]))
    art = load_artifact(run_root / "artifacts/default/sft", "sft")
    assert art.manifest["parent"] is None and art.manifest["config"]["model"]["path"] == str(local)
    assert_lora_trained_and_base_untouched(art.path / "adapter", spy_base)


def test_missing_base_names_make_base(tmp_path):
    env = {"RLHF_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "stages.sft", "logger=none"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 2
    assert "Run `make base` first" in out.stderr and "Traceback" not in out.stderr


def test_wandb_run_is_offline_grouped_and_holds_the_resolved_config(run_root):
    from pipeline.core.tracking import start_tracking
    cfg = compose_config("sft", ["logger=wandb", "run_name=exp1", "lora.r=3"])
    tracker = start_tracking(cfg, "sft")
    try:
        assert tracker.enabled and tracker.run.group == "exp1" and tracker.run.job_type == "sft"
        assert tracker.run.config["lora"]["r"] == 3
        assert tracker.run.config["paths"]["run_dir"] == str(run_root / "artifacts" / "exp1")  # resolved
        tracker.log({"loss": 1.0}, step=1)
    finally:
        tracker.finish()
    assert list((run_root / "wandb").glob("offline-run-*/run-*.wandb")), "no offline run on disk to sync"
    assert not start_tracking(compose_config("sft", QUIET), "sft").enabled


def test_qlora_without_cuda_is_a_clear_error(run_root):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from pipeline.core.errors import PipelineError
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        sft.run(compose_config("sft", TINY_SFT + QUIET + ["model.load_in_4bit=true"]))


def test_loss_covers_assistant_tokens_only(run_root):
    """Worked example: in a two-turn conversation only the answers (and their EOS) carry labels."""
    from pipeline.data.layouts import sft_example
    cfg = compose_config("sft", TINY_SFT + QUIET)
    source = str(run_root / "artifacts/default/base/model")
    fmt = pipeline.models.loading.load_tokenizer(source, cfg.model)
    tokenizer = fmt.tokenizer
    model = pipeline.models.loading.load_causal_lm(source, cfg.model, fmt)
    convo = [{"role": "user", "content": "What is 2 plus 3?"},
             {"role": "assistant", "content": "2 plus 3 is 5."},
             {"role": "user", "content": "Repeat the word 'cup' 2 times."},
             {"role": "assistant", "content": "cup cup"}]
    rows = [sft_example(fmt, {"messages": convo})]
    trainer = sft.sft_trainer(cfg, model, fmt, rows, rows, "none")
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # The rendered text is
    #   <|user|>\nWhat is 2 plus 3?\n<|assistant|>\n2 plus 3 is 5.<|eos|><|user|>\n...\n<|assistant|>\ncup cup<|eos|>
    # and exactly "2 plus 3 is 5.<|eos|>" and "cup cup<|eos|>" are supervised.
    supervised = tokenizer.decode(ids[labels != -100])
    assert supervised == "2 plus 3 is 5.<|eos|>cup cup<|eos|>"
    assert tokenizer.decode(ids[labels == -100]).startswith("<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n")
    assert (labels[labels != -100] == ids[labels != -100]).all()


def test_bad_sampling_settings_fail_before_training(run_root, spy_base):
    from pipeline.core.errors import ConfigError
    with pytest.raises(ConfigError, match="top_p=1.5 must be in"):
        sft.run(compose_config("sft", TINY_SFT + QUIET + ["samples.decoding.top_p=1.5"]))
    assert "model" not in spy_base  # refused before the base model was even loaded


def test_wandb_lineage_base_sft_offline_and_one_run_per_resumed_stage(run_root):
    """Each stage logs its artifact as a W&B reference artifact and its parent as an input, offline
    too; a stage resumed from a checkpoint continues the same W&B run."""
    from pipeline.core.runtime import resolved
    from pipeline.training.resume import TrainerCheckpoints
    from tests.stage.wandb_records import artifacts
    cfg = compose_config("sft", TINY_SFT + ["logger=wandb"])
    sft.run(cfg)
    (run_file,) = (run_root / "wandb").glob("offline-run-*/run-*.wandb")
    stages = [a for a in artifacts(run_file) if a[1] != "run_table"]  # W&B stores tables as artifacts too
    assert stages == [("default-base", "base", True), ("default-sft", "sft", False)]
    # The run id a resumed stage reuses: kept beside the checkpoints, new when starting over.
    ckpts = TrainerCheckpoints(run_root / "work-sft", resolved(cfg), "sft")
    _, first = ckpts.start(resume=True)
    (ckpts.dir / "checkpoint-4").mkdir()
    (ckpts.dir / "checkpoint-4" / "complete.json").write_text("{}")
    last, again = ckpts.start(resume=True)
    assert again == first and last.name == "checkpoint-4"
    assert ckpts.start(resume=False)[1] != first


def test_a_kill_after_the_last_checkpoint_resumes_without_an_extra_step(run_root, monkeypatch, capsys):
    """Killed between the final checkpoint and the artifact: the rerun's result is the
    finished training's, not one more step (the HF trainer checks max_steps only after a step)."""
    import shutil

    from pipeline.training.resume import TrainerCheckpoints
    overrides = TINY_SFT + QUIET + ["train.save_steps=4", "train.logging_steps=2", "train.lr_scheduler_type=constant"]
    with monkeypatch.context() as m:  # the first run keeps its checkpoints, as a kill would
        m.setattr(TrainerCheckpoints, "remove", lambda self: None)
        first = sft.run(compose_config("sft", overrides))
    art = run_root / "artifacts" / "default" / "sft"
    weights = load_file(art / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(art)
    capsys.readouterr()
    again = sft.run(compose_config("sft", overrides))
    out = capsys.readouterr().out
    assert "sft: resuming from" in out and "checkpoint-8" in out  # the final step's checkpoint
    assert again["train_loss"] == first["train_loss"] and again["train_loss_mean"] == first["train_loss_mean"]
    resumed = load_file(art / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
