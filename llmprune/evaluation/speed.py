"""Side-by-side speed of models on this machine: prefill and decode tokens/s, peak memory.

Why side by side: on a shared or thermally throttled machine absolute times drift by tens of percent
between minutes, so the models are timed *alternately* in one process, and the medians of the repeats
are compared. Prefill is one forward over a ``batch × length`` block of random tokens computing the last
position's logits only (as a server does); decode is greedy generation of ``new_tokens`` tokens at
batch 1 with the KV cache. Peak memory is the resident-set high-water mark sampled during each
model's runs, above the level before them, plus the model's weights.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: no sampling, report weights only
        return 0


class _PeakRSS:
    """Samples RSS every millisecond in a thread; ``peak`` is the high-water mark above the start."""

    def __init__(self) -> None:
        self.start = _rss_bytes()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self.start)
            time.sleep(0.001)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self.start)


@dataclass
class Speed:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_seconds: list[float]
    decode_seconds: list[float]
    weights_mib: float
    peak_mib: float  # weights + the largest working set seen above them

    def to_dict(self) -> dict:
        return asdict(self)


def weights_bytes(model: nn.Module) -> int:
    unique = {id(p): p for p in list(model.parameters()) + list(model.buffers())}
    return sum(p.numel() * p.element_size() for p in unique.values())


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """One forward over ``ids`` (B, L) keeping only the last position's logits."""
    start = time.perf_counter()
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except TypeError:  # architectures without logits_to_keep
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy generation of exactly ``new_tokens`` tokens after ``prompt`` (1, P), with the KV cache."""
    start = time.perf_counter()
    model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - start


def compare_speed(
    models: Mapping[str, nn.Module],
    *,
    prefill_batch: int = 8,
    prefill_length: int = 512,
    new_tokens: int = 128,
    prompt_length: int = 16,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Speed]:
    """Time every model alternately (a warm-up, then ``repeats`` rounds); medians per model.

    >>> speeds = compare_speed({"dense": dense, "pruned": small}, repeats=3)  # doctest: +SKIP
    >>> speeds["dense"].decode_tokens_per_s / speeds["pruned"].decode_tokens_per_s  # doctest: +SKIP
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = min(int(m.config.vocab_size) for m in models.values())
    device = next(next(iter(models.values())).parameters()).device
    ids = torch.randint(vocab, (prefill_batch, prefill_length), generator=gen).to(device)
    prompt = torch.randint(vocab, (1, prompt_length), generator=gen).to(device)
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in models}
    peaks = dict.fromkeys(models, 0)
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        model.eval()
        prefill_seconds(model, ids[:1, :32])
        decode_seconds(model, prompt, 2)
    for _ in range(repeats):
        for name, model in models.items():
            with _PeakRSS() as rss:
                times[name][0].append(prefill_seconds(model, ids))
                times[name][1].append(decode_seconds(model, prompt, new_tokens))
            peaks[name] = max(peaks[name], rss.peak)
    out = {}
    for name, model in models.items():
        pre, dec = times[name]
        w = weights_bytes(model)
        out[name] = Speed(
            prefill_tokens_per_s=prefill_batch * prefill_length / statistics.median(pre),
            decode_tokens_per_s=new_tokens / statistics.median(dec),
            prefill_seconds=pre,
            decode_seconds=dec,
            weights_mib=w / 2**20,
            peak_mib=(w + peaks[name]) / 2**20,
        )
    return out


def speedups(speeds: Mapping[str, Speed], base: str) -> dict[str, dict[str, float]]:
    """Each model's prefill and decode speed relative to ``base`` (> 1: faster)."""
    ref = speeds[base]
    return {
        name: {
            "prefill": s.prefill_tokens_per_s / ref.prefill_tokens_per_s,
            "decode": s.decode_tokens_per_s / ref.decode_tokens_per_s,
        }
        for name, s in speeds.items()
    }
