"""LoRA adapters for the RL roles: loading the RM's adapter, and a LoRA Linear forward that
folds each adapter's product into one ``addmm`` (or runs a folded weight copy, with the trained
adapter's gradients by hand).

Shapes: ``x`` (..., in); a LoRA adapter has ``A`` (r, in) and ``B`` (out, r), scale ``s``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

SCORE_KEY = "score."  # the RM head inside the saved adapter (peft modules_to_save)


def rm_adapter(rm_dir: Path) -> tuple[LoraConfig, dict[str, torch.Tensor], torch.Tensor]:
    """The RM adapter's own LoRA config as saved, its LoRA weights, and its score head weight (1, H).

    The config is read whole (rank and alpha patterns, rsLoRA, DoRA, ``layers_to_transform``
    ...), so the reward role computes exactly the function the RM artifact was evaluated with;
    only what makes it a sequence classifier (task type, the head as a module to save) is
    dropped, since the head is applied by hand.
    """
    config = PeftConfig.from_pretrained(rm_dir)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{rm_dir}: the RM adapter is a {type(config).__name__}, not LoRA")
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    state = load_file(rm_dir / "adapter_model.safetensors")
    head = [v for k, v in state.items() if SCORE_KEY in k and k.endswith("weight")]
    if len(head) != 1:
        raise ValueError(f"{rm_dir}: expected one score head weight in the RM adapter, found {len(head)}")
    return config, {k: v for k, v in state.items() if SCORE_KEY not in k}, head[0]


def load_adapter_state(peft: PeftModel, state: dict[str, torch.Tensor], adapter: str) -> None:
    """``set_peft_model_state_dict`` that refuses a partial load: every LoRA weight of ``adapter``
    must come from ``state`` and every entry of ``state`` must land somewhere."""
    result = set_peft_model_state_dict(peft, state, adapter_name=adapter)
    missing = [k for k in result.missing_keys if f".{adapter}." in k and "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {adapter!r} loaded partially: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")


def plain_lora(layer) -> bool:
    """A LoRA Linear that :func:`fused_lora_forward` computes itself: no DoRA or other variant and no
    LoRA bias (fixed once the adapters are loaded)."""
    return not layer.lora_variant and all(b.bias is None for b in layer.lora_B.values())


class _FoldedLoRA(torch.autograd.Function):
    """``y = x W'^T + b`` through a folded copy ``W' = W + sum_a s_a B_a A_a`` (every active adapter),
    with the gradients of the one trained adapter's ``A`` (r, in) and ``B`` (out, r) by hand::

        dL/dx = g W',   dL/dB = s g^T (x A^T),   dL/dA = s (g B)^T x

    The same gradients as the LoRA products (``dL/dx`` takes the adapters' path through ``W'``),
    with one product in the forward pass instead of three. ``x`` (..., in), ``g`` (..., out). On a
    half-precision base (bf16 ``x`` and ``W'``, fp32 ``A`` and ``B``) the products run in ``x``'s
    dtype, as the LoRA products' backward does, and each gradient comes back in its input's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale = scale
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b = ctx.saved_tensors
        dtype = x.dtype
        g = g.to(dtype)
        rows, g_rows = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        grad_x = g @ weight.to(dtype) if ctx.needs_input_grad[0] else None
        grad_a = ((g_rows @ b.to(dtype)).t() @ rows * ctx.scale).to(a.dtype)
        grad_b = (g_rows.t() @ (rows @ a.to(dtype).t()) * ctx.scale).to(b.dtype)
        return grad_x, None, None, grad_a, grad_b, None


def _trains(layer, adapter: str) -> bool:
    return torch.is_grad_enabled() and layer.lora_A[adapter].weight.requires_grad


def fused_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward, ``W x + sum_a s_a B_a A_a x`` over the active adapters, with each
    adapter's scale and sum folded into one ``addmm``: two fewer passes over the (rows x out)
    output per adapter than ``result + lora_B(lora_A(x)) * s``, and none of peft's per-call checks
    (this runs ~1000 times an update on small inputs, where Python overhead rivals the arithmetic).

    Adapters folded by :meth:`SharedBaseActorCritic.fold` run as their copy of W, with no product:
    a role whose adapters are all folded runs one product, through :class:`_FoldedLoRA` where one
    of them trains; otherwise a frozen adapter's single fold stands in for W. Anything but plain
    LoRA (DoRA and other variants, LoRA biases, mixed-adapter batches, merged weights) takes
    peft's own forward."""
    if not layer._rl_plain or layer.disable_adapters or layer.merged or "adapter_names" in kwargs:
        return type(layer).forward(layer, x, *args, **kwargs)
    base, adapters = layer.base_layer, layer.active_adapters
    if layer._folded:
        whole = layer._folded.get("+".join(adapters))
        if whole is not None:
            trained = [a for a in adapters if _trains(layer, a)]
            if not trained:
                return whole(x)
            if len(trained) == 1 and layer._rl_folds_grads and not layer.training \
                    and not torch.is_autocast_enabled(x.device.type):
                a = trained[0]
                return _FoldedLoRA.apply(x, whole.weight, whole.bias, layer.lora_A[a].weight,
                                         layer.lora_B[a].weight, layer.scaling[a])
        folded = [a for a in adapters if a in layer._folded and not _trains(layer, a)]
        if folded:  # W + s B_a A_a of a frozen adapter, precomputed
            base, adapters = layer._folded[folded[0]], [a for a in adapters if a != folded[0]]
    result = base(x, *args, **kwargs)
    out = result.reshape(-1, result.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    for a in adapters:
        if a not in layer.lora_A:
            continue
        weight_a = layer.lora_A[a].weight
        xa = torch.nn.functional.linear(layer.lora_dropout[a](rows) if layer.training else rows,
                                        weight_a.to(rows.dtype))  # dropout is the identity in eval mode
        out = torch.addmm(out, xa.to(out.dtype), layer.lora_B[a].weight.t().to(out.dtype), alpha=layer.scaling[a])
    return out.view(result.shape)
