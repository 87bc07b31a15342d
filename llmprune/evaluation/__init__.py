"""Measuring models: ``perplexity`` (GPTQ protocol) and ``harness`` (lm-eval on the in-memory model).

Submodules are imported on use, so ``import llmprune`` never imports lm-eval.
"""
