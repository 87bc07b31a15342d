"""Tiny models of several architectures, built from configs (no hub), and a tiny offline tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64)

#: name -> (config class, kwargs); widths divisible by 8 so every N:M pattern under test fits
ARCHITECTURES = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **_COMMON,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **_COMMON,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **_COMMON,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            **_COMMON,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **_COMMON),
    ),
}


def make_model(arch: str, seed: int = 0):
    cls_name, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from threads (on a busy 2-core machine they cost
    several times over), and tests comparing with subprocesses need the same kernels, hence the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold. Where there is a will there is a way. "
) * 40


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences: fully offline, vocabulary <= VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100],
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
