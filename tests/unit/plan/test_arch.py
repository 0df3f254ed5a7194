"""pipeline.plan.arch: a decoder's shape and parameter count from its config.json alone."""

import pytest
from transformers import AutoConfig, LlamaForCausalLM

from pipeline.core.errors import PipelineError
from pipeline.plan.arch import Arch, arch_of, count_params, read_arch
from pipeline.plan.memory import linear_params, lora_params

pytestmark = pytest.mark.unit

# A hand-sized decoder: 2 layers, hidden 8, MLP 16, 2 heads of 4 with 1 key/value head, vocab 32.
TINY = dict(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=32, tied=True)


def test_parameters_counted_by_hand():
    # kv width = head_dim 4 x 1 kv head = 4. Per layer: q, o 2 x 8 x 8 = 128; k, v 2 x 8 x 4 = 64;
    # gate, up, down 3 x 8 x 16 = 384; two norms 16 -> 592. Two layers 1184, final norm 8, the
    # embedding 32 x 8 = 256 (tied: the LM head is the same table) -> 1448; untied: + 256 = 1704.
    assert count_params(2, 8, 16, 4, 32, tied=True) == 1448
    assert count_params(2, 8, 16, 4, 32, tied=False) == 1704
    # An ungated MLP (GPT-2's up and down): 2 x 8 x 16 = 256 instead of 384 a layer -> 1448 - 2 x 128 = 1192.
    assert count_params(2, 8, 16, 4, 32, tied=True, gated=False) == 1192
    assert arch_of("tiny", **TINY) == Arch("tiny", 1448.0, 2, 8, 16, 4, 32, True)
    # The 8B shape: 8.03e9, as Meta states.
    llama3 = arch_of("llama3", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                     tied=False)
    assert llama3.kv == 1024 and round(llama3.params / 1e9, 2) == 8.03


def test_read_arch_matches_the_model_transformers_builds(tmp_path):
    config = AutoConfig.for_model("llama", hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                  tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    arch = read_arch(str(tmp_path / "config.json"), "tiny")  # the file or its folder
    assert arch == Arch("tiny", 1704.0, 2, 8, 16, 4, 32, False) == read_arch(str(tmp_path), "tiny")
    assert arch.params == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_lora_parameters_counted_by_hand():
    # Per layer, r x (in + out): q, o 2 x 16; k, v 2 x 12; gate, up, down 3 x 24 -> 128 r; 2 layers, r 2: 512.
    # (peft's all-linear LoRA on the model above has exactly 512 trainable parameters.)
    assert lora_params(arch_of("tiny", **TINY), 2) == 512
    # Without a gate (GPT-2's MLP: up and down only) the MLP gives 2 x 24: 104 r per layer -> 416.
    assert lora_params(arch_of("tiny", **TINY, gated=False), 2) == 416


def test_adapted_linear_parameters_counted_by_hand():
    # q, o 2 x 8 x 8 = 128; k, v 2 x 8 x 4 = 64; gate, up, down 3 x 8 x 16 = 384 -> 576 a layer, 1152;
    # without the gate 2 x 128 = 256 -> 448 a layer, 896.
    assert linear_params(arch_of("tiny", **TINY)) == 1152
    assert linear_params(arch_of("tiny", **TINY, gated=False)) == 896


def test_a_folder_without_config_is_refused_by_name(tmp_path):
    with pytest.raises(PipelineError, match="cannot read the model's shape from .*config.json"):
        read_arch(str(tmp_path))


def test_gpt2_names_and_its_default_mlp_width_are_read(tmp_path):
    # GPT-2 leaves n_inner unset: its MLP is 4 x n_embd wide. Its MLP is ungated.
    AutoConfig.for_model("gpt2", n_embd=8, n_layer=2, n_head=2, vocab_size=32).save_pretrained(tmp_path)
    arch = read_arch(str(tmp_path), "gpt2")
    assert (arch.layers, arch.hidden, arch.intermediate, arch.kv, arch.gated, arch.tied) == (2, 8, 32, 8, False, True)


def test_a_config_that_needs_remote_code_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (tmp_path / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}')
    with pytest.raises(PipelineError, match="cannot read the model's shape"):
        read_arch(str(tmp_path))
    assert not marker.exists()
