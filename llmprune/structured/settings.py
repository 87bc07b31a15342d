"""Names and options of structured pruning, validated without a model (recipes use this: a leaf)."""

from __future__ import annotations

from typing import Any

from llmprune.errors import ConfigError, did_you_mean

STRUCTURED = ("depth", "width", "heads", "auto")
METHODS = {
    "depth": ("block_influence", "angular", "residual"),
    "width": ("obs", "wanda_sp", "flap"),
    "heads": ("obs", "wanda_sp", "flap"),
    "auto": ("obs",),
}
#: ``wanda`` (the unstructured default method) selects the structure's default
DEFAULT_METHOD = {"depth": "block_influence", "width": "obs", "heads": "obs", "auto": "obs"}
OPTIONS = {
    "dampening_frac": 0.01,
    "refit": None,
    "width_multiple": 8,
    "obs_rounds": 32,
    "depth_method": None,
    # auto: the decode speed-up a split must be predicted to reach (speedmodel.MIN_DECODE_SPEEDUP; 0: off)
    "min_decode_speedup": 1.25,
}
SHAPE_KEYS = (
    "num_hidden_layers",
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "num_key_value_heads",
    "num_attention_heads",
)


def resolve_method(structure: str, method: str | None) -> str:
    if structure not in STRUCTURED:
        raise ConfigError(
            f"unknown structure {structure!r}{did_you_mean(str(structure), (*STRUCTURED, 'unstructured'))}: "
            "choose unstructured, depth, width, heads or auto."
        )
    if method in (None, "wanda"):
        return DEFAULT_METHOD[structure]
    if method not in METHODS[structure]:
        raise ConfigError(
            f"--method {method!r} does not apply to --structure {structure}"
            f"{did_you_mean(str(method), METHODS[structure])}; choose {', '.join(METHODS[structure])}."
        )
    return method


def check_settings(
    structure: str, method: str | None, sparsity: Any, options: dict[str, Any]
) -> dict[str, Any]:
    """Validate a structured request without a model (recipes call this); returns the options."""
    resolve_method(structure, method)
    unknown = set(options) - set(OPTIONS) - set(SHAPE_KEYS)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"unknown structured option {name!r}{did_you_mean(name, (*OPTIONS, *SHAPE_KEYS))}; known: "
            f"{', '.join((*OPTIONS, *SHAPE_KEYS))}."
        )
    depth = options.get("depth_method")
    if depth is not None and depth not in METHODS["depth"]:
        raise ConfigError(
            f"option depth_method={depth!r}{did_you_mean(str(depth), METHODS['depth'])}: choose "
            f"{', '.join(METHODS['depth'])}."
        )
    speedup = options.get("min_decode_speedup", 0)
    if speedup is not None and (isinstance(speedup, (str, bool)) or not 0 <= float(speedup) <= 100):
        raise ConfigError(
            f"option min_decode_speedup must be a number such as 1.25 (0 or null: no speed target), got "
            f"{speedup!r}."
        )
    for key in set(options) & set(SHAPE_KEYS):
        if isinstance(options[key], bool) or not isinstance(options[key], int) or options[key] < 1:
            raise ConfigError(
                f"option {key} must be a positive integer (the new size), got {options[key]!r}."
            )
    if not any(k in SHAPE_KEYS for k in options) and (
        isinstance(sparsity, (str, bool)) or not 0 <= float(sparsity) < 1
    ):
        raise ConfigError(
            f"--structure {structure} takes --sparsity as the fraction of decoder-block parameters "
            f"to remove, between 0 and 1 (e.g. 0.3), got {sparsity!r}."
        )
    return {**OPTIONS, **{k: v for k, v in options.items() if k in OPTIONS}}
