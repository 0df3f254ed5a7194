"""Four PPO roles on one frozen base model, as LoRA adapters plus two scalar heads.

    role       adapters active          trainable   head
    policy     policy                   yes         lm_head (base, frozen)
    reference  ref (= SFT adapter)      no          lm_head
    reward     ref + reward (RM)        no          reward_head (RM's score head)
    value      ref + value              yes         value_head (init: RM's head)

The reference is the SFT model (base + SFT adapter), *not* the base with adapters
disabled: under LoRA that would be the plain pretrained model, the wrong KL anchor.
The RM was trained on base + SFT merged, so reward = base + SFT delta + RM delta, which
is what activating both adapters computes. The base weights exist once in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.artifacts import Artifact
from pipeline.models import load_causal_lm
from pipeline.policies import base_source_for

SCORE_KEY = "score."  # the RM head inside the saved adapter (peft modules_to_save)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0. (B, L) -> (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def split_rm_state(rm_dir: Path) -> tuple[LoraConfig, dict[str, torch.Tensor], torch.Tensor]:
    """The RM adapter's LoRA config, its LoRA weights, and its score head weight (1, H)."""
    cfg = json.loads((rm_dir / "adapter_config.json").read_text())
    lora = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                      lora_dropout=0.0, bias=cfg["bias"], task_type="CAUSAL_LM")
    state = load_file(rm_dir / "adapter_model.safetensors")
    head = [v for k, v in state.items() if SCORE_KEY in k and k.endswith("weight")]
    if len(head) != 1:
        raise ValueError(f"{rm_dir}: expected one score head weight in the RM adapter, found {len(head)}")
    lora_state = {k: v for k, v in state.items() if SCORE_KEY not in k}
    return lora, lora_state, head[0]


class SharedBaseActorCritic(nn.Module):
    """Policy, reference, reward and value models sharing one frozen base (see module doc)."""

    def __init__(self, peft: PeftModel, reward_head: nn.Linear, value_head: nn.Linear):
        super().__init__()
        self.peft, self.reward_head, self.value_head = peft, reward_head, value_head
        self.reward_head.requires_grad_(False)
        self.trainable = [p for n, p in peft.named_parameters()
                          if ".policy." in n or ".value." in n] + list(value_head.parameters())
        self._activate(["policy"])

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_artifacts(cls, sft: Artifact, rm: Artifact, model_cfg, tokenizer, value_init: str):
        base = load_causal_lm(base_source_for(sft), model_cfg, tokenizer)
        peft = PeftModel.from_pretrained(base, sft.path / "adapter", adapter_name="ref", is_trainable=False)
        peft.load_adapter(sft.path / "adapter", adapter_name="policy", is_trainable=True)
        lora, rm_state, rm_head = split_rm_state(rm.path / "adapter")
        peft.add_adapter("reward", lora)
        set_peft_model_state_dict(peft, rm_state, adapter_name="reward")
        peft.add_adapter("value", lora)
        hidden = rm_head.shape[1]
        reward_head = nn.Linear(hidden, 1, bias=False)
        value_head = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            reward_head.weight.copy_(rm_head)
            if value_init == "rm":  # the usual choice: V starts as the RM (adapter and head)
                set_peft_model_state_dict(peft, rm_state, adapter_name="value")
                value_head.weight.copy_(rm_head)
            elif value_init == "fresh":  # a new LoRA adapter (B = 0) and a zero head
                value_head.weight.zero_()
            else:
                raise ValueError(f"ppo.value_init must be 'rm' or 'fresh', got {value_init!r}")
        # The heads stay fp32 whatever the base dtype: Adam's small updates to the value head
        # would round away in bf16.
        return cls(peft, reward_head, value_head).to(base.device)

    # --- adapters -------------------------------------------------------------------

    def _activate(self, names: list[str]) -> None:
        # peft's set_adapter also toggles requires_grad; freeze everything it touched,
        # then re-arm exactly the parameters the optimizer owns.
        self.peft.base_model.set_adapter(names, inference_mode=True)
        for p in self.trainable:
            p.requires_grad_(True)

    def _backbone(self):
        """The transformer body under the LM head (``model`` for Llama/Qwen2, ``transformer`` for GPT-2)."""
        return self.peft.base_model.model.base_model

    # --- roles ----------------------------------------------------------------------

    def policy_logits(self, ids, mask, adapter: str = "policy") -> torch.Tensor:
        """(B, L, V) logits of the policy (or ``adapter="ref"`` for the SFT reference)."""
        self._activate([adapter])
        return self.peft(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         use_cache=False).logits

    def _hidden(self, names: list[str], ids, mask) -> torch.Tensor:
        self._activate(names)
        out = self._backbone()(input_ids=ids, attention_mask=mask,
                               position_ids=position_ids_from_mask(mask), use_cache=False)
        return out.last_hidden_state  # (B, L, H)

    def values(self, ids, mask) -> torch.Tensor:
        """(B, L) value of every prefix: V(x_{<=t})."""
        h = self._hidden(["ref", "value"], ids, mask)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)

    def scores(self, ids, mask, last_index: torch.Tensor) -> torch.Tensor:
        """(B,) RM score read at ``last_index`` (the last real token of each sequence)."""
        h = self._hidden(["ref", "reward"], ids, mask)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return self.reward_head(h[rows, last_index].to(self.reward_head.weight.dtype)).squeeze(-1)

    def generate(self, **kwargs):
        self._activate(["policy"])
        return self.peft.generate(**kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    # --- saving -----------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Policy and value adapters plus the value head: everything PPO changes."""
        state = {f"policy.{k}": v for k, v in get_peft_model_state_dict(self.peft, adapter_name="policy").items()}
        state.update({f"value.{k}": v for k, v in get_peft_model_state_dict(self.peft, adapter_name="value").items()})
        state["value_head.weight"] = self.value_head.weight
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for adapter in ("policy", "value"):
            sub = {k[len(adapter) + 1:]: v for k, v in state.items() if k.startswith(adapter + ".")}
            set_peft_model_state_dict(self.peft, sub, adapter_name=adapter)
        with torch.no_grad():
            self.value_head.weight.copy_(state["value_head.weight"])

    def save_final(self, out: Path, tokenizer) -> None:
        """``policy/`` (a LoRA adapter on the base, loadable with PeftModel) and ``value/``."""
        self.peft.save_pretrained(out, selected_adapters=["policy", "value"])
        tokenizer.save_pretrained(out / "policy")
        save_file({"weight": self.value_head.weight.detach().cpu().contiguous()},
                  out / "value" / "value_head.safetensors")
