"""Where each architecture keeps the structures llmprune can remove, and which config keys say so.

A *layout* names, relative to one decoder block, the Linears whose output rows are the MLP's
intermediate channels (``mlp_in``), the Linear whose input columns read them (``mlp_out``), and, for
architectures whose config can express fewer heads at the same width (an explicit ``head_dim``), the
q/k/v/o projections. GPT-2, GPT-NeoX and OPT derive the head size as ``hidden_size / num_heads``, so a
config with fewer heads would change the head size: heads are refused there, depth and width work.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmprune.errors import ConfigError

STRUCTURES = ("depth", "width", "heads")


@dataclass(frozen=True)
class Layout:
    model_type: str
    mlp_in: tuple[str, ...]  # Linears whose output rows are the intermediate channels
    mlp_out: str  # the Linear whose input columns are the intermediate channels
    width_key: str  # config key of the intermediate size
    attn: tuple[str, str, str, str] | None = None  # q, k, v, o (None: heads cannot be expressed)
    conv1d: bool = False  # GPT-2 stores weights as (in, out)

    @property
    def structures(self) -> tuple[str, ...]:
        return STRUCTURES if self.attn else ("depth", "width")


_LLAMA_LIKE = dict(
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    width_key="intermediate_size",
    attn=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
)

LAYOUTS = {
    "llama": Layout("llama", **_LLAMA_LIKE),
    "mistral": Layout("mistral", **_LLAMA_LIKE),
    "qwen2": Layout("qwen2", **_LLAMA_LIKE),
    "opt": Layout("opt", mlp_in=("fc1",), mlp_out="fc2", width_key="ffn_dim"),
    "gpt2": Layout("gpt2", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", width_key="n_inner", conv1d=True),
    "gpt_neox": Layout(
        "gpt_neox",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        width_key="intermediate_size",
    ),
}


def layout_of(model: nn.Module) -> Layout:
    """The layout of ``model``'s architecture, or a one-line error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise ConfigError(
            f"structured pruning does not know the {model_type!r} architecture; it supports "
            f"{', '.join(sorted(LAYOUTS))}. Fix: use --structure unstructured for this model."
        )
    return LAYOUTS[model_type]


def check_structure(layout: Layout, structure: str) -> None:
    """Refuse a structure the architecture's config cannot express, before any work."""
    if structure in ("auto", "unstructured") or structure in layout.structures:
        return
    raise ConfigError(
        f"{layout.model_type} configs cannot express removing {structure} (the head size is "
        f"hidden_size / num_attention_heads there); this architecture supports "
        f"{', '.join(layout.structures)}. Fix: --structure {' or '.join(layout.structures)}."
    )


@dataclass(frozen=True)
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def queries_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def head_geometry(config) -> HeadGeometry:
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return HeadGeometry(heads, kv, head_dim)
