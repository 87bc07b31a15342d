"""Model surgery: a smaller state dict and a config that says its shape, then a plain HF model.

Why rebuild rather than edit modules in place: a model instantiated from the new config is exactly
what ``AutoModelForCausalLM.from_pretrained(out)`` will build, so attention modules carry the new head
counts, blocks are renumbered (``layer_idx``, KV-cache slots), per-layer lists such as ``layer_types``
are consistent, and nothing is monkey-patched. The weights are sliced from the old state dict.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import find_blocks
from llmprune.errors import ConfigError
from llmprune.structured.arch import HeadGeometry, Layout, head_geometry, layout_of

log = logging.getLogger(__name__)


@dataclass
class Removal:
    """Exactly what is removed: blocks by original index; per kept block, MLP channels and KV groups."""

    blocks: list[int] = field(default_factory=list)
    channels: dict[int, list[int]] = field(default_factory=dict)  # block -> intermediate channels
    kv_groups: dict[int, list[int]] = field(default_factory=dict)  # block -> key-value heads (with queries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": sorted(self.blocks),
            "channels": {str(k): sorted(v) for k, v in sorted(self.channels.items())},
            "kv_groups": {str(k): sorted(v) for k, v in sorted(self.kv_groups.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Removal:
        return cls(
            blocks=list(data.get("blocks", [])),
            channels={int(k): list(v) for k, v in data.get("channels", {}).items()},
            kv_groups={int(k): list(v) for k, v in data.get("kv_groups", {}).items()},
        )


def _uniform_count(per_block: dict[int, list[int]], kept: list[int], what: str) -> int:
    counts = {len(per_block.get(i, [])) for i in kept}
    if len(counts) > 1:
        raise ConfigError(
            f"every kept block must lose the same number of {what} (the config holds one size), got "
            f"{sorted(counts)}."
        )
    return counts.pop() if counts else 0


def check_removal(model: nn.Module, removal: Removal) -> None:
    """Refuse a removal the config cannot express or that leaves nothing, before anything is changed."""
    layout = layout_of(model)
    _, blocks = find_blocks(model)
    n = len(blocks)
    bad = [i for i in removal.blocks if not 0 <= i < n]
    if bad or len(set(removal.blocks)) >= n:
        raise ConfigError(f"cannot remove blocks {sorted(set(removal.blocks))} of {n}: keep at least one.")
    kept = [i for i in range(n) if i not in set(removal.blocks)]
    width = mlp_width(model, layout)
    if _uniform_count(removal.channels, kept, "MLP channels") >= width or any(
        not 0 <= c < width for v in removal.channels.values() for c in v
    ):
        raise ConfigError(f"cannot remove those MLP channels: each block has {width}; keep at least one.")
    if any(removal.kv_groups.values()):
        if layout.attn is None:
            raise ConfigError(
                f"{layout.model_type} configs cannot express removing heads; supported: "
                f"{', '.join(layout.structures)}."
            )
        geom = head_geometry(model.config)
        count = _uniform_count(removal.kv_groups, kept, "key-value heads")
        if count >= geom.num_kv_heads or any(
            not 0 <= g < geom.num_kv_heads for v in removal.kv_groups.values() for g in v
        ):
            raise ConfigError(
                f"cannot remove {count} key-value heads: the model has {geom.num_kv_heads} "
                f"(each with {geom.queries_per_group} query heads); keep at least one."
            )


def mlp_width(model: nn.Module, layout: Layout) -> int:
    _, blocks = find_blocks(model)
    w = blocks[0].get_submodule(layout.mlp_out).weight
    return int(w.shape[0] if layout.conv1d else w.shape[1])


def head_indices(geom: HeadGeometry, groups: list[int]) -> tuple[Tensor, Tensor]:
    """Removed KV groups -> (indices of q rows and o columns, indices of k and v rows)."""
    hd, rep = geom.head_dim, geom.queries_per_group
    q = [h * hd + j for g in sorted(groups) for h in range(g * rep, (g + 1) * rep) for j in range(hd)]
    kv = [g * hd + j for g in sorted(groups) for j in range(hd)]
    return torch.tensor(q, dtype=torch.long), torch.tensor(kv, dtype=torch.long)


def _drop(t: Tensor, dim: int, removed: Tensor) -> Tensor:
    keep = torch.ones(t.shape[dim], dtype=torch.bool)
    keep[removed] = False
    return t.index_select(dim, keep.nonzero().flatten()).contiguous()


def _slice_block(
    sd: dict[str, Tensor], base: str, layout: Layout, rows: dict[str, Tensor], cols: dict[str, Tensor]
):
    """Drop output rows (and bias entries) of ``rows`` modules and input columns of ``cols`` modules."""
    out_dim, in_dim = (1, 0) if layout.conv1d else (0, 1)
    for rel, idx in rows.items():
        if idx.numel():
            sd[f"{base}.{rel}.weight"] = _drop(sd[f"{base}.{rel}.weight"], out_dim, idx)
            if f"{base}.{rel}.bias" in sd:
                sd[f"{base}.{rel}.bias"] = _drop(sd[f"{base}.{rel}.bias"], 0, idx)
    for rel, idx in cols.items():
        if idx.numel():
            sd[f"{base}.{rel}.weight"] = _drop(sd[f"{base}.{rel}.weight"], in_dim, idx)


def shrink_state_dict(model: nn.Module, removal: Removal) -> dict[str, Tensor]:
    """The state dict of the smaller model: blocks dropped and renumbered, rows and columns sliced."""
    layout = layout_of(model)
    prefix, blocks = find_blocks(model)
    old = model.state_dict()
    dropped = set(removal.blocks)
    kept = [i for i in range(len(blocks)) if i not in dropped]
    renumber = {i: j for j, i in enumerate(kept)}
    sd: dict[str, Tensor] = {}
    for key, t in old.items():
        if key.startswith(prefix + "."):
            idx, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(idx) in dropped:
                continue
            key = f"{prefix}.{renumber[int(idx)]}.{rest}"
        sd[key] = t
    geom = head_geometry(model.config) if layout.attn else None
    for i in kept:
        base = f"{prefix}.{renumber[i]}"
        ch = torch.tensor(sorted(removal.channels.get(i, [])), dtype=torch.long)
        rows = {rel: ch for rel in layout.mlp_in}
        cols = {layout.mlp_out: ch}
        groups = removal.kv_groups.get(i, [])
        if groups:
            q_idx, kv_idx = head_indices(geom, groups)
            q, k, v, o = layout.attn
            rows.update({q: q_idx, k: kv_idx, v: kv_idx})
            cols[o] = q_idx
        _slice_block(sd, base, layout, rows, cols)
    return sd


def shrunk_config(model: nn.Module, removal: Removal):
    """A copy of the config with the new shape; per-layer lists (``layer_types``…) follow the kept blocks."""
    layout = layout_of(model)
    _, blocks = find_blocks(model)
    n = len(blocks)
    dropped = set(removal.blocks)
    kept = [i for i in range(n) if i not in dropped]
    cfg = copy.deepcopy(model.config)
    for key, value in cfg.to_diff_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            setattr(cfg, key, type(value)(value[i] for i in kept))
    cfg.num_hidden_layers = len(kept)
    width = mlp_width(model, layout)
    removed_channels = len(removal.channels.get(kept[0], []))
    setattr(cfg, layout.width_key, width - removed_channels)
    if layout.attn is not None:
        geom = head_geometry(model.config)
        groups = len(removal.kv_groups.get(kept[0], []))
        cfg.head_dim = geom.head_dim  # explicit: the head size must not follow hidden_size / heads
        cfg.num_key_value_heads = geom.num_kv_heads - groups
        cfg.num_attention_heads = (geom.num_kv_heads - groups) * geom.queries_per_group
    return cfg


def _empty_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:  # skip random initialisation: every weight is about to be overwritten
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def rebuild(model: nn.Module, removal: Removal) -> nn.Module:
    """A new model of the smaller shape holding the sliced weights (the input model is not changed).

    >>> removal = Removal(blocks=[3, 7], channels={i: [0, 5] for i in range(30)})  # doctest: +SKIP
    >>> small = rebuild(model, removal)  # doctest: +SKIP
    """
    check_removal(model, removal)
    cfg = shrunk_config(model, removal)
    sd = shrink_state_dict(model, removal)
    param = next(model.parameters())
    new = _empty_model(cfg, param.dtype)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    tied = set(getattr(new, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(
            f"internal: the rebuilt {type(new).__name__} does not match the sliced weights "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); please report this."
        )
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    new.to(param.device).eval()
    new.generation_config = copy.deepcopy(getattr(model, "generation_config", new.generation_config))
    new.name_or_path = getattr(model, "name_or_path", "")
    return new
