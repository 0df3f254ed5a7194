"""A decoder's shape, as the memory model counts it: from a model folder's config.json (or a hub id's),
never from its weights, and never running the model's own code (``trust_remote_code`` stays off).

The parameter count is computed from the shape, for a Llama-style decoder: q and o projections
(H x H), k and v (H x H_kv), a gated MLP (gate, up, down: H x I each; GPT-2's plain MLP has two),
two norms a layer, one final norm, and the embeddings (the LM head is a second V x H table unless
tied). Biases (Qwen2's q, k, v; GPT-2's) and learned position tables (GPT-2) are left out: they are
under 0.1% of a 7B model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError

UNGATED = ("gpt2",)  # model types whose MLP is up and down only (no gate)


@dataclass(frozen=True)
class Arch:
    name: str
    params: float  # total parameters
    layers: int
    hidden: int
    intermediate: int
    kv: int  # key/value width: head_dim * kv_heads (hidden * kv_heads / heads when head_dim is not given)
    vocab: int
    tied: bool  # the LM head shares the input embedding table
    gated: bool = True  # the MLP has a gate projection (three H x I matrices, else two)


def count_params(layers: int, hidden: int, intermediate: int, kv: int, vocab: int, tied: bool,
                 gated: bool = True) -> int:
    """Parameters of the decoder (see the module docstring for what is counted)."""
    mlp = (3 if gated else 2) * hidden * intermediate
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + mlp + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def arch_of(name: str, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
            tied: bool, head_dim: int | None = None, gated: bool = True) -> Arch:
    """An Arch from the config's numbers, its parameter count computed from them."""
    kv = (head_dim or hidden // heads) * kv_heads
    return Arch(name, float(count_params(layers, hidden, intermediate, kv, vocab, tied, gated)), layers, hidden,
                intermediate, kv, vocab, tied, gated)


def arch_from_config(config, name: str) -> Arch:
    """The shape of a transformers ``PretrainedConfig`` (its text part, for a multimodal model).
    GPT-2's names (n_embd, n_layer, n_head, n_inner) are reached through the config's attribute map."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = c.hidden_size, c.num_attention_heads
    return arch_of(name, layers=c.num_hidden_layers, hidden=hidden,
                   intermediate=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden,
                   heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads, vocab=c.vocab_size,
                   tied=bool(getattr(c, "tie_word_embeddings", True)), head_dim=getattr(c, "head_dim", None),
                   gated=c.model_type not in UNGATED)


def read_arch(source: str, name: str | None = None) -> Arch:
    """The shape of the model at ``source``: a local folder (or its config.json) or a hub id; only
    config.json is read."""
    from transformers import AutoConfig

    folder = Path(source).parent if Path(source).is_file() else source
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise PipelineError(f"cannot read the model's shape from {source}: {e}. model.path must name a model "
                            "folder (or hub id) with a config.json") from e
    return arch_from_config(config, name or Path(str(folder)).name)
