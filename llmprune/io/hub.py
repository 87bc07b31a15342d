"""Publishing a saved checkpoint folder to the Hugging Face Hub.

The token comes from wherever ``huggingface_hub`` finds it (``--token``, ``HF_TOKEN``, or the cached
``hf auth login``); the endpoint from ``HF_ENDPOINT`` or ``endpoint=``. Failures become one error that
names the fix instead of a stack of HTTP internals.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmprune.errors import ConfigError, LlmpruneError

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$|^[A-Za-z0-9][\w.-]{0,95}$")


class HubError(LlmpruneError, ConnectionError):
    """The Hub could not be reached, or refused the upload."""

    transient = False  # True when retrying may help (timeouts, 5xx)


def check_repo_id(hub_model_id: str | None) -> str:
    if not hub_model_id or not _REPO_ID.match(hub_model_id) or ".." in hub_model_id:
        raise ConfigError(
            f"hub_model_id {hub_model_id!r} is not a Hub repository id: use 'your-name/model-name' (letters, "
            "digits, '-', '_', '.')."
        )
    return hub_model_id


def push_to_hub(
    output_dir: str | Path,
    hub_model_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload pruned model (llmprune)",
    endpoint: str | None = None,
    timeout: float = 60.0,
    retries: int = 2,
) -> str:
    """Create ``hub_model_id`` if needed and upload the folder; return the repository URL.

    Nothing waits forever: the token is checked first (one small request), every request has a
    ``timeout`` in seconds (connect and between bytes), and a network failure is retried ``retries``
    times with a growing pause before it becomes one error that names the fix.

    >>> push_to_hub("out/wanda-2of4", "me/SmolLM2-135M-wanda-2of4", private=True)  # doctest: +SKIP
    'https://huggingface.co/me/SmolLM2-135M-wanda-2of4'
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(output_dir).expanduser()
    check_repo_id(hub_model_id)
    if not (folder / "config.json").is_file() and not any(folder.glob("*.gguf")):  # dense, compressed, gguf
        raise ConfigError(
            f"{folder} holds no config.json or .gguf file: push a folder written by `llmprune prune "
            "--output_dir` or `llmprune export`."
        )
    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set, so the Hub is disabled: unset HF_HUB_OFFLINE to push.")
    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    token = token or get_token()
    if not token:
        raise HubError(
            "no Hub token found: log in with `hf auth login`, set HF_TOKEN, or pass --token with a token "
            "that can write to that namespace."
        )
    with bounded_session(timeout):
        _with_retries(lambda: _check_token(api, token, hub_model_id), where, retries)
        return _with_retries(
            lambda: _upload(api, folder, hub_model_id, private, commit_message), where, retries
        )


def _check_token(api, token: str, hub_model_id: str) -> None:
    """One small authenticated request before any upload: a bad token fails in seconds."""
    from huggingface_hub.utils import get_session

    url = f"{api.endpoint}/api/whoami-v2"
    response = get_session().get(url, headers={"authorization": f"Bearer {token}"})
    if response.status_code in (401, 403):
        raise HubError(
            f"the Hub at {api.endpoint} refused the token ({response.status_code}) for {hub_model_id}: log "
            "in with `hf auth login`, set HF_TOKEN, or pass --token with a token that has write access."
        )


@contextmanager
def bounded_session(timeout: float) -> Iterator[None]:
    """huggingface_hub's shared HTTP client waits forever by default: bound it for this push only."""
    from huggingface_hub.utils import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = type(previous)(timeout, connect=min(timeout, 10.0))
    try:
        yield
    finally:
        session.timeout = previous


def _with_retries(call, where: str, retries: int):
    """Run ``call``; retry network failures (not refusals) ``retries`` times, 1 s, 2 s, 4 s … apart."""
    for attempt in range(retries + 1):
        try:
            return call()
        except HubError:
            raise
        except Exception as exc:
            error = _as_hub_error(exc, where)
            if error is None:
                raise
            if not getattr(error, "transient", False) or attempt == retries:
                raise error from exc
            pause = 2**attempt
            name = type(exc).__name__
            log.warning("the Hub at %s did not answer (%s): retrying in %d s", where, name, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _upload(api, folder: Path, hub_model_id: str, private: bool, commit_message: str) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        # private=None, not False: without --private the namespace's default applies (an organisation
        # that makes repositories private by default stays private)
        repo = api.create_repo(hub_model_id, private=True if private else None, exist_ok=True)
        log.info("uploading %s to %s …", folder, repo)
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            ignore_patterns=[".*", "**/.*"],
        )
    except OfflineModeIsEnabled as exc:
        raise HubError(f"{exc}") from exc
    return str(repo)


def _as_hub_error(exc: BaseException, where: str) -> HubError | None:
    """A HubError for network and HTTP failures (``transient`` when a retry may help), else None."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return HubError(
                f"the Hub at {where} refused the upload ({status}): log in with `hf auth login`, set "
                "HF_TOKEN, or pass --token with a token that has write access to that namespace."
            )
        error = HubError(f"the Hub at {where} rejected the upload: {exc}")
        error.transient = status is None or status >= 500 or status == 429
        return error
    transport = type(exc).__module__.split(".")[0].startswith("httpx")  # httpx errors are not OSErrors
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)) or transport:
        error = HubError(_unreachable(where, exc))
        error.transient = True
        return error
    return None


def _unreachable(where: str, exc: BaseException) -> str:
    return (
        f"could not reach the Hub at {where} ({type(exc).__name__}: {exc}). Fix: check the network or proxy, "
        "or HF_ENDPOINT if you use a mirror; the saved folder is complete, so retry later with "
        "`llmprune push OUTPUT_DIR --hub_model_id ID`."
    )
