"""The RL roles on one frozen base model, as LoRA adapters plus scalar heads.

    role       adapters active          trainable   head
    policy     policy                   yes         lm_head (base, frozen)
    reference  ref (= SFT adapter)      no          lm_head
    reward     ref + reward (RM)        no          reward_head (RM's score head)
    value      ref + value              yes         value_head (init: RM's head, rescaled)

The reference is the SFT model (base + SFT adapter), *not* the base with adapters
disabled: under LoRA that would be the plain pretrained model, the wrong KL anchor.
The RM was trained on base + SFT merged, so reward = base + SFT delta + RM delta, which
is what activating both adapters computes. The base weights exist once in memory, except
that on narrow models (``ppo.fold_adapters``) each role also runs as a copy of the adapted
weights with its adapters folded in.
Critic-free estimators (RLOO, GRPO, REINFORCE++) build no value adapter or head.

Shapes: ``B`` sequences, ``L`` tokens (left-padded prompt of ``P`` then response of ``T``),
``H`` hidden size, ``V`` vocabulary; the RL passes take :class:`Packed` batches of ``R`` rows of
``W`` tokens, several sequences to a row.
"""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.core.artifacts import Artifact
from pipeline.data.chat import ChatFormat
from pipeline.models.loading import load_causal_lm
from pipeline.models.policies import base_source_for
from pipeline.rl.logprobs import entropy_from_logits, head_logprobs, logprobs_from_logits
from pipeline.rl.lora import fused_lora_forward, load_adapter_state, plain_lora, rm_adapter
from pipeline.rl.rollout import Packed, position_ids_from_mask


class SharedBaseActorCritic(nn.Module):
    """Policy, reference, reward and (optionally) value models sharing one frozen base."""

    def __init__(self, peft: PeftModel, reward_head: nn.Linear, value_head: Optional[nn.Linear]):
        super().__init__()
        self.peft, self.reward_head, self.value_head = peft, reward_head, value_head
        self.reward_head.requires_grad_(False)
        value_params = list(value_head.parameters()) if value_head is not None else []
        self.trainable = [p for n, p in peft.named_parameters()
                          if ".policy." in n or ".value." in n] + value_params
        for module in peft.modules():
            if isinstance(module, LoraLinear):
                module.forward = types.MethodType(fused_lora_forward, module)
                module._rl_plain = plain_lora(module)
                module._folded = {}  # "a+b" -> a copy of base_layer with adapters a and b folded in
                # _FoldedLoRA computes F.linear with A and B as given: not for GPT-2's Conv1D
                module._rl_folds_grads = isinstance(module.base_layer, nn.Linear) and not module.fan_in_fan_out
        # Freeze every adapter once, then arm exactly the optimizer's parameters; switching roles
        # afterwards only repoints each LoRA layer (peft's set_adapter walks every module and
        # toggles requires_grad, ~4 ms a call, ~30 calls an update).
        peft.base_model.set_adapter(["policy"], inference_mode=True)
        for p in self.trainable:
            p.requires_grad_(True)
        self._layers = [m for m in peft.modules() if isinstance(m, BaseTunerLayer)]
        self._active: Optional[list[str]] = None
        self._activate(["policy"])
        self.lm_head_by_hand, self.packs_rows = self._check_shortcuts()
        self.attention_cost = self._attention_cost()
        self._vocab = self.peft.get_output_embeddings().out_features  # sizes head_logprobs' chunks
        self.folds = False

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_artifacts(cls, sft: Artifact, rm: Artifact, model_cfg, fmt: ChatFormat, value_init: Optional[str],
                       reward_scale: tuple[float, float] = (0.0, 1.0)):
        """``value_init``: ``rm`` (value = RM adapter and head), ``fresh`` (a new adapter, B = 0, and a
        zero head) or None (no value role). ``reward_scale`` is the ``(mean, std)`` the RM's scores
        are normalised with, so that a value started from the RM predicts the normalised score."""
        base = load_causal_lm(base_source_for(sft), model_cfg, fmt)
        peft = PeftModel.from_pretrained(base, sft.path / "adapter", adapter_name="ref", is_trainable=False)
        peft.load_adapter(sft.path / "adapter", adapter_name="policy", is_trainable=True)
        lora, rm_state, rm_head = rm_adapter(rm.path / "adapter")
        peft.add_adapter("reward", lora)
        load_adapter_state(peft, rm_state, "reward")
        hidden = rm_head.shape[1]
        # The heads stay fp32 whatever the base dtype: Adam's small updates to the value head
        # would round away in bf16.
        reward_head = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            reward_head.weight.copy_(rm_head)
        value_head = None
        if value_init is not None:
            peft.add_adapter("value", lora)
            value_head = nn.Linear(hidden, 1, bias=True)
            with torch.no_grad():
                if value_init == "rm":  # V starts as the RM, on the scale rewards are normalised to
                    load_adapter_state(peft, rm_state, "value")
                    mean, std = reward_scale
                    value_head.weight.copy_(rm_head / std)
                    value_head.bias.fill_(-mean / std)
                elif value_init == "fresh":
                    value_head.weight.zero_()
                    value_head.bias.zero_()
                else:
                    raise ValueError(f"ppo.value_init must be 'rm' or 'fresh', got {value_init!r}")
        return cls(peft, reward_head, value_head).to(base.device)

    # --- adapters -------------------------------------------------------------------

    def _activate(self, names: list[str]) -> None:
        """Route every LoRA layer to the adapters ``names`` (what peft's set_adapter ends with)."""
        if names == self._active:
            return
        self._active = list(names)
        for layer in self._layers:
            layer._active_adapter = self._active
        self.peft.base_model.active_adapter = self._active

    def _backbone(self):
        """The transformer body under the LM head (``model`` for Llama/Qwen2, ``transformer`` for GPT-2)."""
        return self.peft.base_model.model.base_model

    def lora_share(self) -> float:
        """FLOPs of one rank-r adapter over those of the linear layers it adapts:
        sum r (in + out) / sum in * out. ~0.25 at hidden 128 and r 16, ~0.01 at hidden 4096."""
        layers = [m for m in self._layers if isinstance(m, LoraLinear) and "ref" in m.lora_A]
        lora = sum(m.lora_A["ref"].weight.shape[0] * (m.in_features + m.out_features) for m in layers)
        return lora / max(1, sum(m.in_features * m.out_features for m in layers))

    def _attention_cost(self) -> Optional[float]:
        """A token's attention FLOPs per column of its packed row over its linear layers' FLOPs,
        what :func:`~pipeline.rl.rollout.row_width` weighs: per layer, QK^T and PV cost
        ``4 n_heads d_head`` a column against ``2 N`` for the layer's ``N`` linear weights. None
        (rows twice the longest sequence) when the config lacks a size."""
        config = self.peft.base_model.model.config
        layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if not (layers and heads and hidden):
            return None
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        weights = sum(m.in_features * m.out_features if hasattr(m, "in_features") else m.weight.numel()
                      for name, m in self._backbone().named_modules()
                      if isinstance(m, (nn.Linear, Conv1D)) and "lora_" not in name)
        return 4 * heads * head_dim * layers / (2 * weights) if weights else None

    @torch.no_grad()
    def fold(self, *adapters: str) -> int:
        """Fold ``adapters`` into a copy of each weight they adapt, W + sum_a s_a B_a A_a (summed in
        float64, rounded once); a pass with exactly these adapters active then runs that copy
        instead of the LoRA products. Worth it on narrow models, where an adapter costs a large
        share of a layer (:meth:`lora_share`). The copy is no module of the model: nothing trains
        or saves it, so a trained adapter's copies are folded again after each optimizer step
        (:meth:`refold`). Returns the bytes held."""
        held, key = 0, "+".join(adapters)
        for m in self._layers:
            if not (isinstance(m, LoraLinear) and m._rl_plain and all(a in m.lora_A for a in adapters)):
                continue
            base, copy_ = m.base_layer, m._folded.get(key)
            if copy_ is None:
                copy_ = m._folded[key] = copy.deepcopy(base).requires_grad_(False)
            delta = sum(m.lora_B[a].weight.double() @ m.lora_A[a].weight.double() * m.scaling[a] for a in adapters)
            copy_.weight.copy_(base.weight.double() + (delta.T if m.fan_in_fan_out else delta))
            held += copy_.weight.numel() * copy_.weight.element_size()
        return held

    def _roles(self) -> list[tuple[str, ...]]:
        """The adapter sets of the roles: reference, reward, policy and (with a critic) value."""
        return [("ref",), ("ref", "reward"), ("policy",)] + ([("ref", "value")] if self.value_head is not None else [])

    def fold_adapters(self) -> int:
        """From now on every role runs folded: one product a linear layer for the reference, reward,
        value and policy passes, sampling included. Float rounding differs from the LoRA
        products' (~1e-7 relative in fp32). Returns the bytes of the copies (one per role)."""
        self.folds = True
        return sum(self.fold(*role) for role in self._roles())

    @torch.no_grad()
    def refold(self) -> None:
        """Fold the trained adapters again (after an optimizer step or a load): the policy's copy is
        W + s B A, the value's the SFT copy + s B A, one fp32 ``addmm`` a layer (float64 sums, as
        :meth:`fold` makes, cost ~10 ms an optimizer step on the tiny model, most of what folding
        saves). On a half-precision base the sum is made in fp32 and rounded once into the copy."""
        if not self.folds:
            return
        for m in self._layers:
            if not isinstance(m, LoraLinear) or not m._folded:
                continue
            for key, frozen, a in (("policy", m.base_layer, "policy"), ("ref+value", m._folded.get("ref"), "value")):
                copy_ = m._folded.get(key)
                if copy_ is None:
                    continue
                A, B = m.lora_A[a].weight, m.lora_B[a].weight
                left, right = (A.t(), B.t()) if m.fan_in_fan_out else (B, A)  # fan_in_fan_out: (in, out)
                if {copy_.weight.dtype, frozen.weight.dtype, A.dtype, B.dtype} == {torch.float32}:
                    torch.addmm(frozen.weight, left, right, alpha=m.scaling[a], out=copy_.weight)
                else:  # addmm takes one dtype: sum in fp32, round once into the (bf16, fp16) copy
                    copy_.weight.copy_(torch.addmm(frozen.weight.float(), left.float(), right.float(),
                                                   alpha=m.scaling[a]))

    # --- roles ----------------------------------------------------------------------

    # --- roles ----------------------------------------------------------------------

    def response_logits(self, ids, mask, response_len: int, adapter: str = "policy") -> torch.Tensor:
        """(B, T, V) logits that predict the last ``response_len`` tokens, of the policy (or
        ``adapter="ref"``): the LM head runs only at those positions, never over the prompt."""
        self._activate([adapter])
        out = self.peft(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=False, logits_to_keep=response_len + 1)
        return out.logits[:, :-1]  # position P - 1 + t predicts response token t

    def logprobs(self, p: Packed, response_ids, temperature: float, adapter: str = "policy",
                 with_entropy: bool = False):
        """(B, T) log-probs of ``response_ids`` under softmax(logits / T) of the policy (or
        ``adapter="ref"``), from a packed batch: the LM head runs only at the positions that
        predict a response token, and no ``[B, T, V]`` fp32 copy is made. ``with_entropy``:
        ``(log-probs, entropies)``, the entropy of softmax(logits / T) at each position, (B, T)."""
        if self.lm_head_by_hand:
            h = p.gather(self._packed_hidden([adapter], p), p.prefix)  # (B, T, H)
            return head_logprobs(self._lm_logits, h, response_ids, self._vocab, temperature, with_entropy)
        # a family whose output scaling the hand-applied head does not reproduce: every position
        self._activate([adapter])
        logits = p.gather(self.peft(input_ids=p.ids, position_ids=p.positions, use_cache=False).logits, p.prefix)
        logp = logprobs_from_logits(logits, response_ids, temperature)
        return (logp, entropy_from_logits(logits, temperature)) if with_entropy else logp

    def _packed_hidden(self, names: list[str], p: Packed) -> torch.Tensor:
        """(R, W, H) final hidden states of packed rows (no attention mask: transformers builds the
        block-diagonal causal mask from the restarting positions)."""
        self._activate(names)
        return self._backbone()(input_ids=p.ids, position_ids=p.positions, use_cache=False).last_hidden_state

    def _lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The causal LM's logits from final hidden states, with the families' output scalings."""
        config = self.peft.base_model.model.config
        logits = self.peft.get_output_embeddings()(h)
        if getattr(config, "logit_scale", None) is not None:  # Cohere
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None) is not None:  # Granite
            logits = logits / config.logits_scaling
        if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma 2 and 3
            logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
        return logits

    @torch.no_grad()
    def _check_shortcuts(self) -> tuple[bool, bool]:
        """Whether (1) the LM head applied by hand to hidden states gives the model's own logits and
        (2) sequences packed two to a row, in a batch of two rows, give what each gives alone. A family
        that fails (1) runs the LM head over every position; one that fails (2) packs one sequence per
        row. Two rows, on the model's own device and attention implementation, because that is what
        training runs: transformers finds packed sequences for flash-attention only in a batch of one
        row, and there several rows would attend across their sequences."""
        was_training = self.training
        self.eval()
        try:
            vocab = self.peft.base_model.model.config.vocab_size
            seqs = [(torch.arange(n, device=self.device) * k + c) % vocab for n, k, c in
                    ((5, 7, 3), (3, 5, 2), (4, 3, 1), (4, 11, 6))]  # rows: seqs 0 + 1 and 2 + 3, 8 columns
            alone = [self.peft(input_ids=x[None], use_cache=False).logits[0].float() for x in seqs]
            ids = torch.stack([torch.cat(seqs[:2]), torch.cat(seqs[2:])])
            pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]], device=self.device)
            by_hand = self._lm_logits(self._backbone()(input_ids=seqs[0][None], use_cache=False).last_hidden_state)
            packed = self.peft(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            # Half precision rounds differently under another attention mask; a leak across
            # sequences moves logits by their own scale, far beyond either tolerance.
            tol = 1e-3 if self.peft.get_output_embeddings().weight.dtype == torch.float32 else 3e-2

            def close(x, y):
                return bool(torch.allclose(x, y, rtol=tol, atol=tol * float(y.abs().max().clamp(min=1))))

            split = [packed[0, :5], packed[0, 5:], packed[1, :4], packed[1, 4:]]
            return close(by_hand[0].float(), alone[0]), all(close(x, y) for x, y in zip(split, alone))
        finally:
            self.train(was_training)

    def sequence_logprobs(self, ids) -> torch.Tensor:
        """(B, L - 1) policy log-probs of each next token of unpadded ``ids`` (B, L): PPO-ptx's
        language-modelling term on pretraining text."""
        if self.lm_head_by_hand:
            self._activate(["policy"])
            h = self._backbone()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            return head_logprobs(self._lm_logits, h, ids[:, 1:], self._vocab)
        self._activate(["policy"])
        logits = self.peft(input_ids=ids, use_cache=False).logits[:, :-1]
        return logprobs_from_logits(logits, ids[:, 1:])

    def _hidden(self, names: list[str], ids, mask) -> torch.Tensor:
        self._activate(names)
        out = self._backbone()(input_ids=ids, attention_mask=mask,
                               position_ids=position_ids_from_mask(mask), use_cache=False)
        return out.last_hidden_state  # (B, L, H)

    def response_values(self, p: Packed) -> torch.Tensor:
        """(B, T) value of the prefix before each response token, from a packed batch."""
        h = p.gather(self._packed_hidden(["ref", "value"], p), p.prefix)  # (B, T, H)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def response_scores(self, p: Packed) -> torch.Tensor:
        """(B,) RM score of each packed sequence, read at its last token."""
        h = p.gather(self._packed_hidden(["ref", "reward"], p), p.last)  # (B, H)
        return self.reward_head(h.to(self.reward_head.weight.dtype)).squeeze(-1)

    def values(self, ids, mask) -> torch.Tensor:
        """(B, L) value of every prefix: V(x_{<=t})."""
        h = self._hidden(["ref", "value"], ids, mask)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)

    def scores(self, ids, mask, last_index: torch.Tensor) -> torch.Tensor:
        """(B,) RM score read at ``last_index`` (the last real token of each sequence)."""
        h = self._hidden(["ref", "reward"], ids, mask)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return self.reward_head(h[rows, last_index].to(self.reward_head.weight.dtype)).squeeze(-1)

    @contextmanager
    def sampling(self):
        """The policy as a causal LM to sample from: the PEFT model with only the policy adapter
        active (with :meth:`fold_adapters` on, through the policy's folded weights)."""
        self._activate(["policy"])
        yield self.peft

    def gradient_checkpointing(self, enable: bool) -> None:
        """Recompute activations in the backward pass instead of keeping them (HF checkpointing only
        runs in train mode, so the update then runs in train mode with every dropout at 0)."""
        if not enable:
            return
        self.peft.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        for m in self.peft.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    # --- saving -----------------------------------------------------------------------

    def _adapters(self) -> tuple[str, ...]:
        return ("policy", "value") if self.value_head is not None else ("policy",)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Policy (and value) adapters plus the value head: everything RL changes."""
        state = {f"{a}.{k}": v for a in self._adapters()
                 for k, v in get_peft_model_state_dict(self.peft, adapter_name=a, save_embedding_layers=False).items()}
        if self.value_head is not None:
            state.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for adapter in self._adapters():
            load_adapter_state(self.peft, {k[len(adapter) + 1:]: v for k, v in state.items()
                                           if k.startswith(adapter + ".")}, adapter)
        if self.value_head is not None:
            self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in state.items()
                                             if k.startswith("value_head.")})
        self.refold()

    def save_final(self, out: Path, fmt: ChatFormat) -> None:
        """``policy/`` (a LoRA adapter on the base, loadable with AutoPeftModelForCausalLM) and,
        with a critic, ``value/`` (adapter + ``value_head.safetensors``)."""
        self.peft.save_pretrained(out, selected_adapters=list(self._adapters()), save_embedding_layers=False)
        fmt.save(out / "policy")
        if self.value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      out / "value" / "value_head.safetensors")
