"""The Hugging Face Hub: whether it answers, and what the local cache holds. Used before loading a model by its Hub id
(train, generate, evaluate's CLIP model) so a Hub out of reach fails in seconds with one line, and by `sd3tune check`.

Only the standard library at import time: ``hub_cache_dir`` / ``cached_snapshot(_dir)`` / ``hub_token_found`` read the
environment and the cache folder the way huggingface_hub does, without importing it (`check` stays fast);
huggingface_hub and httpx load inside the functions that ask the Hub.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from sd3tune.errors import Sd3tuneError

HUB_PROBE_SECONDS = 3.0


def hf_home() -> Path:
    """huggingface_hub's home folder, resolved the way it does (HF_HOME, else XDG_CACHE_HOME/huggingface)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser()


def hub_cache_dir() -> Path:
    """The Hub cache folder: HF_HUB_CACHE, else HF_HOME's ``hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def cached_snapshot(repo_id: str, filename: str = "model_index.json") -> bool:
    """Whether any cached snapshot of the Hub model ``repo_id`` holds ``filename`` (no huggingface_hub import)."""
    return cached_snapshot_dir(repo_id, filename) is not None


def cached_snapshot_dir(repo_id: str, filename: str = "model_index.json") -> Path | None:
    """The cached snapshot folder of the Hub model ``repo_id`` that holds ``filename``: the one ``refs/main`` names
    (what a load without a revision uses), else the newest; None when none does (no huggingface_hub import)."""
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    try:
        main = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    except (OSError, ValueError):
        main = None
    if main is not None and (main / filename).is_file():
        return main
    found = [p.parent for p in (repo / "snapshots").glob(f"*/{filename}")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def hub_token_found() -> bool:
    """Whether a Hugging Face token is set (HF_TOKEN, HUGGING_FACE_HUB_TOKEN) or saved (HF_TOKEN_PATH, else HF_HOME's
    ``token``): gated models need one."""
    token_file = Path(os.environ.get("HF_TOKEN_PATH") or hf_home() / "token").expanduser()
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or token_file.is_file())


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None when it answers. Offline mode (HF_HUB_OFFLINE) says
    so at once; otherwise one request to the Hub's endpoint (HF_ENDPOINT; proxies from the environment apply) with
    a short timeout, where huggingface_hub itself would retry for about a minute before giving up."""
    import httpx
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)  # any answer, even an error status, means it is reachable
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as exc:
        return f"{constants.ENDPOINT} cannot be reached ({str(exc).strip() or type(exc).__name__})"
    return None


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the local Hugging Face cache holds ``filename`` of the Hub model ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id: the loader says why
        return False


def hub_files_only(repo_id: str, what: str, filename: str, hint: str) -> bool:
    """Before loading ``what`` by its Hub id ``repo_id``: True when the Hub is out of reach but the local cache holds
    it (``filename`` stands for it), so it loads with ``local_files_only`` at once; False when the Hub answers.
    Out of reach and not cached: raises the one-line error with ``hint`` now, instead of after the loader's retries
    and its page of advice."""
    why = hub_unreachable()
    if why is None:
        return False
    if not in_hub_cache(repo_id, filename):
        raise Sd3tuneError(f"cannot load {what}: it is not in the local Hugging Face cache and the Hub is out of "
                           f"reach: {why}", hint=hint)
    return True


def model_files_only(model: str, otherwise: str) -> bool:
    """``hub_files_only`` for the diffusers model ``model`` (a Hub id), whose error says how to download it, or
    ``otherwise`` (the local alternative: the flag or key to set)."""
    return hub_files_only(model, model, "model_index.json",
                          hint=f"download it once where the Hub is reachable (`hf download {shlex.quote(model)}`; "
                               f"gated models need `hf auth login` and accepted terms), or {otherwise}")
