"""Exceptions a user can act on: each message names the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlmpruneError(Exception):
    """Base class: anything llmprune raises on purpose."""


class ConfigError(LlmpruneError, ValueError):
    """A setting is out of range, unknown or inconsistent."""


class DataError(LlmpruneError, ValueError):
    """Calibration or evaluation data is missing, empty or unreadable."""


class ModelLoadError(LlmpruneError, OSError):
    """The model could not be found or read."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix, or an empty string when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
