"""The Hugging Face Hub: whether it answers, and what the local cache holds. Used before loading a model by its Hub id
(train, generate, evaluate's CLIP model) so a Hub out of reach fails in seconds with one line, and by `sd3tune check`.

Only the standard library at import time: ``hub_cache_dir`` / ``cached_snapshot(_dir)`` / ``hub_token_found`` read the
environment and the cache folder the way huggingface_hub does, without importing it (`check` stays fast);
huggingface_hub and httpx load inside the functions that ask the Hub.
"""

from __future__ import annotations

import os
import re
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
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    import httpx  # after: offline mode answers without it
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


PUSH_PROBE_SECONDS = 1.0  # a push out of reach fails within 2 s, before anything is exported
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repository id, ORG/NAME."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".git", "."))


def check_push(repo_id: str) -> None:
    """Before an export that will be pushed to ``repo_id``: its form, the Hub in reach and a token found (from the
    environment or `hf auth login`; sd3tune never writes one). Fails in under 2 s with one line."""
    if not is_repo_id(repo_id):
        raise Sd3tuneError(f"--push-to-hub {repo_id!r} is not a Hub repository id",
                           hint="pass ORG/NAME, e.g. --push-to-hub my-name/myst-sd3-lora")
    why = hub_unreachable(timeout=PUSH_PROBE_SECONDS)
    if why is not None:
        raise Sd3tuneError(f"cannot push to {repo_id}: the Hugging Face Hub is out of reach: {why}; nothing was "
                           "exported", hint="export without --push-to-hub now and push the folder later with "
                                            "`hf upload`, or run again where the Hub is reachable")
    if not hub_token_found():
        raise Sd3tuneError(f"cannot push to {repo_id}: no Hugging Face token", hint="run `hf auth login`, or set HF_TOKEN")


def push_folder(folder: Path, files: list[str], repo_id: str, private: bool) -> tuple[str, bool | None]:
    """Upload ``files`` (paths relative to ``folder``: what this export wrote, not an earlier export's) to the Hub
    model repository ``repo_id`` (created, private unless ``private`` is False, when missing); returns its URL and
    whether it is private as the Hub says after the upload (None when it cannot be read): a repository that existed
    keeps its own visibility, whatever ``private`` asked. The token comes from huggingface_hub's own lookup
    (environment, `hf auth login`)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="sd3tune export", allow_patterns=files)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise Sd3tuneError(f"pushing {folder} to {repo_id} failed: {first}",
                           hint="check the token's write access (`hf auth whoami`) and the repository name; the "
                                "export itself is complete") from None
    try:
        visible = api.model_info(repo_id).private
    except (HfHubHTTPError, OSError, ValueError, AttributeError):
        visible = None
    return str(url), visible if isinstance(visible, bool) else None
