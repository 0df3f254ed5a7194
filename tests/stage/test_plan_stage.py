"""`make plan` on the world's model and a local config.json, and every training stage's fit to a card on
the tiny chain: auto batches resolved and an unfit configuration refused before any weight loads."""

import re

import pytest
from transformers import AutoConfig

from pipeline.core.errors import ConfigError
from pipeline.plan.arch import read_arch
from pipeline.plan.memory import GiB, ppo_breakdown, sft_breakdown
from stages import plan
from tests.conftest import compose_config
from tests.stage.conftest import QUIET, TINY_RM, TINY_SFT
from tests.stage.test_ppo_stage import TINY_PPO

pytestmark = pytest.mark.stage


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")]


def test_plan_of_the_worlds_model_before_make_base(root, capsys):
    plans = plan.run(compose_config("plan", ["gpu_memory=24GiB"]))
    out = capsys.readouterr().out
    assert out.startswith("plan for tiny-llama (conf/base.yaml: the world's model, no base artifact yet): ")
    assert "card: 24.00 GiB (gpu_memory=24GiB); the options fill at most 21.60 GiB (10% kept free)" in out
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["sft"] * 5 + ["rm"] * 5 + ["ppo"] * 5
    configured = [r for r in rows if r[1].startswith("as configured")]
    assert [r[1] for r in configured] == ["as configured: fp32, length 128", "as configured: fp32, length 128 (pairs)",
                                          "as configured: fp32, prompt 512 + 24"]
    assert all(r[5] == "yes" for r in rows) and set(plans) == {"sft", "rm", "ppo"}


def test_plan_of_a_local_config(tmp_path, root, capsys):
    # A 155M-parameter Llama shape: fp32 weights 0.58 GiB; the default sft batch (32 rows of 128 tokens)
    # saves 1.31 GiB of 16-bit activations (planned for a card: precision auto is bf16 there).
    AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                         tie_word_embeddings=False).save_pretrained(tmp_path)
    plans = plan.run(compose_config("plan", [f"model.path={tmp_path}", "gpu_memory=2GiB"]))
    out = capsys.readouterr().out
    arch = read_arch(str(tmp_path))
    assert f"{arch.params / 1e6:.1f}M parameters, 8 layers, hidden 1024, MLP 2816, kv 256, vocab 32000" in out
    sft = sft_breakdown(arch, weight_bytes=4, act_bytes=2, r=16, micro=32, length=128, checkpointing=False)
    assert plans["sft"]["peak"] == sft["peak"]
    rows = {(r[0], r[1].split(":")[0]): r for r in table_rows(out)}
    assert rows["sft", "as configured"][4] == f"{sft['peak'] / GiB:.2f}"
    assert rows["sft", "as configured"][5] == ("yes" if sft["peak"] <= 0.9 * 2 * GiB else "no")
    # on a card ppo.sampler=auto samples with CUDA graphs, whose KV cache is held all run
    ppo = ppo_breakdown(arch, weight_bytes=4, act_bytes=2, r=16, micro=16, gen=64, prompt=512, response=24,
                        checkpointing=False, held_cache=True)
    assert rows["ppo", "as configured"][4] == f"{ppo['peak'] / GiB:.2f}" and rows["ppo", "as configured"][5] == "no"
    # Each fitting option fits the 90% budget and says how to get it.
    for (stage, label), r in rows.items():
        if label != "as configured" and r[5] == "yes":
            assert float(r[4]) <= 0.9 * 2 and r[6]


def test_make_plan_passes_stage_overrides_and_refuses_unknown_keys(tmp_path, root, capsys):
    AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp_path)
    plans = plan.launch([f"model.path={tmp_path}", "train.max_length=64", "ppo.micro_batch_size=auto",
                         "stages=[sft,ppo]"])
    out = capsys.readouterr().out
    assert "as configured: fp32, length 64" in out and set(plans) == {"sft", "ppo"}
    assert plans["ppo"]["settings"].kw["micro"] == 32  # no card: auto takes the minibatch, and says so
    assert "ppo: ppo.micro_batch_size=auto -> 32 (no CUDA device" in out
    with pytest.raises(SystemExit) as e:
        plan.launch(["trian.max_length=3"])
    assert e.value.code == 2
    assert re.search(r"no key of conf/plan.yaml or conf/\{sft,rm,ppo\}.yaml matches \['trian.max_length=3'\]",
                     capsys.readouterr().err)


def test_ppo_resolves_auto_batches_and_refuses_an_unfit_card_before_loading(chain, capsys):
    from stages import ppo

    with pytest.raises(ConfigError) as e:
        ppo.run(compose_config("ppo", TINY_PPO + ["gpu_memory=64KiB"]))
    assert "\n" not in str(e.value) and str(e.value).startswith("ppo: the predicted peak ")
    assert "does not fit the card's 64.00 KiB (gpu_memory=64KiB)" in str(e.value)
    final = ppo.run(compose_config("ppo", TINY_PPO + ["ppo.total_updates=1", "ppo.micro_batch_size=auto",
                                                      "ppo.generation_batch_size=auto"]))
    assert final["updates"] == 1
    assert "ppo.micro_batch_size=auto -> 4, ppo.generation_batch_size=auto -> 8 (no CUDA device" \
        in capsys.readouterr().out


def test_sft_and_rm_refuse_an_unfit_card_before_loading(chain, monkeypatch):
    """The refusal comes before the stage's loader is ever called, in one line, and leaves the chain's
    artifacts as they were."""
    from stages import rm, sft

    def loaded(*args, **kwargs):
        raise AssertionError("weights loaded before the card was checked")

    monkeypatch.setattr(sft, "load_causal_lm", loaded)
    monkeypatch.setattr(rm, "sft_backbone_classifier", loaded)
    before = {p: p.read_bytes() for p in (chain / "artifacts").rglob("*") if p.is_file()}
    for stage, overrides in ((sft, TINY_SFT), (rm, TINY_RM)):
        name = stage.__name__.split(".")[-1]
        with pytest.raises(ConfigError) as e:
            stage.run(compose_config(name, overrides + QUIET + ["gpu_memory=64KiB"]))
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{name}: the predicted peak ")
        assert "does not fit the card's 64.00 KiB (gpu_memory=64KiB)" in str(e.value)
    assert {p: p.read_bytes() for p in (chain / "artifacts").rglob("*") if p.is_file()} == before
