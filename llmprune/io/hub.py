"""Publishing a saved checkpoint folder to the Hugging Face Hub.

The token comes from wherever ``huggingface_hub`` finds it (``--token``, ``HF_TOKEN``, or the cached
``hf auth login``); the endpoint from ``HF_ENDPOINT`` or ``endpoint=``. Failures become one error that
names the fix instead of a stack of HTTP internals.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from llmprune.errors import ConfigError, LlmpruneError

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$|^[A-Za-z0-9][\w.-]{0,95}$")


class HubError(LlmpruneError, ConnectionError):
    """The Hub could not be reached, or refused the upload."""


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
) -> str:
    """Create ``hub_model_id`` if needed and upload the folder; return the repository URL.

    >>> push_to_hub("out/wanda-2of4", "me/SmolLM2-135M-wanda-2of4", private=True)  # doctest: +SKIP
    'https://huggingface.co/me/SmolLM2-135M-wanda-2of4'
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

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
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(
                f"the Hub at {where} refused the upload to {hub_model_id} ({status}): log in with "
                "`hf auth login`, "
                "set HF_TOKEN, or pass --token with a token that has write access to that namespace."
            ) from exc
        raise HubError(f"the Hub at {where} rejected the upload to {hub_model_id}: {exc}") from exc
    except (OSError, ConnectionError) as exc:
        raise HubError(_unreachable(where, exc)) from exc
    except Exception as exc:  # httpx transport errors are not OSErrors
        if type(exc).__module__.split(".")[0].startswith("httpx"):
            raise HubError(_unreachable(where, exc)) from exc
        raise
    return str(repo)


def _unreachable(where: str, exc: BaseException) -> str:
    return (
        f"could not reach the Hub at {where} ({type(exc).__name__}: {exc}). Fix: check the network or proxy, "
        "or HF_ENDPOINT if you use a mirror; the saved folder is complete, so retry later with "
        "`llmprune push OUTPUT_DIR --hub_model_id ID`."
    )
