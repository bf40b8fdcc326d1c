"""The Hugging Face Hub, when there is one: fail in seconds without it, publish with it.

huggingface_hub retries a failed connection five times with back-off (~30 s per file) before it
falls back to its cache. evomerge asks once, within ``HF_HUB_ETAG_TIMEOUT`` seconds, whether
the Hub's host answers; when it does not (or ``HF_HUB_OFFLINE=1``), the process goes offline:
cached files are used at once, and a file that is not cached fails with one line.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from evomerge.errors import EvomergeError, describe


@functools.cache
def offline_reason() -> str | None:
    """Why the Hub cannot be used (``None`` when its host answered); cached per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline (HF_HUB_OFFLINE is set)"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=constants.HF_HUB_ETAG_TIMEOUT).close()
    except OSError as e:
        return f"unreachable ({host}: {e.strerror or describe(e)})"
    return None


def use_cache_if_offline() -> str | None:
    """Switch huggingface_hub to its cache when the Hub cannot be reached; returns why, or None."""
    reason = offline_reason()
    if reason is not None:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at each request: no retries, cache only
    return reason


def not_cached(what: str, reason: str) -> EvomergeError:
    return EvomergeError(f"{what}: not in the local Hub cache, and the Hub is {reason}; "
                         "fetch it once online or name a local folder")


def require_hub(what: str) -> None:
    """Refuse, before any work, an action that needs the Hub when it cannot be reached."""
    if (reason := offline_reason()) is not None:
        raise EvomergeError(f"{what}: the Hub is {reason}")


def push_folder(folder: str | Path, repo: str, *, private: bool = False, api: Any = None) -> str:
    """Upload an exported model folder (weights, config, tokenizer, model card) to the Hub model
    repository ``repo`` (created when missing); returns the repository's URL. Credentials are
    huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``)."""
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise EvomergeError(f"{folder}: not an exported model folder (no README.md model card)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message=f"evomerge: upload {folder.name}")
    except Exception as e:  # auth, name, network: one line either way
        raise EvomergeError(f"push to {repo!r}: {describe(e)}") from None
    return str(url)
