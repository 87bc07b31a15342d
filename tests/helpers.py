"""Small models and data shared by the recovery, export and inspection tests (pruned without the engine)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

VOCAB = 128
HIDDEN = 32


def tiny_llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def magnitude_prune(model: nn.Module, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    """Zero the smallest |w| of each Linear inside the decoder layers; return keep-masks as (out, in)."""
    prefix, layers = (
        ("model.layers", model.model.layers)
        if hasattr(model, "model")
        else ("transformer.h", model.transformer.h)
    )
    keep = {}
    with torch.no_grad():
        for lname, layer in layers.named_children():
            for name, m in layer.named_modules():
                if isinstance(m, (nn.Linear, Conv1D)):
                    thr = m.weight.abs().flatten().kthvalue(int(sparsity * m.weight.numel())).values
                    m.weight.masked_fill_(m.weight.abs() <= thr, 0.0)
                    k = m.weight != 0
                    keep[f"{prefix}.{lname}.{name}"] = k.t() if isinstance(m, Conv1D) else k
    return keep


def chain_windows(n: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    """Learnable windows: each next token is a fixed permutation of the current one."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=gen)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(VOCAB, (n,), generator=gen)
    for t in range(1, length):
        ids[:, t] = perm[ids[:, t - 1]]
    return ids


def lm_loss(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)
