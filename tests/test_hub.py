"""sd3tune.hub: where the Hugging Face cache is (as huggingface_hub finds it, without importing it), whether it holds
a model, whether a token is there, and the one-line error when the Hub is out of reach and the cache lacks a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd3tune import hub
from sd3tune.errors import Sd3tuneError

HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")


@pytest.fixture()
def hub_env(monkeypatch, tmp_path):
    """No Hub variable set, and a home folder of the test's own."""
    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_the_cache_folder_is_found_as_huggingface_hub_finds_it(hub_env, tmp_path):
    assert hub.hf_home() == tmp_path / "home" / ".cache" / "huggingface"
    assert hub.hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    hub_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    hub_env.setenv("HF_HOME", "~/hf")
    assert hub.hf_home() == tmp_path / "home" / "hf" and hub.hub_cache_dir() == tmp_path / "home" / "hf" / "hub"
    hub_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.hub_cache_dir() == tmp_path / "cache" and hub.hf_home() == tmp_path / "home" / "hf"
    hub_env.setenv("HF_HUB_CACHE", "")  # empty: as unset
    assert hub.hub_cache_dir() == tmp_path / "home" / "hf" / "hub"


def test_a_model_is_cached_when_a_snapshot_holds_the_file(hub_env, tmp_path):
    cache = tmp_path / "cache"
    hub_env.setenv("HF_HUB_CACHE", str(cache))
    assert not hub.cached_snapshot("org/model")
    snapshot = cache / "models--org--model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    assert not hub.cached_snapshot("org/model")  # a download cut short: no model_index.json yet
    (snapshot / "model_index.json").write_text("{}")
    assert hub.cached_snapshot("org/model") and not hub.cached_snapshot("org/other")
    assert not hub.cached_snapshot("org/model", "config.json")
    (snapshot / "config.json").write_text("{}")
    assert hub.cached_snapshot("org/model", "config.json")


def test_a_token_counts_when_set_or_saved(hub_env, tmp_path):
    assert not hub.hub_token_found()
    token = tmp_path / "home" / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_x")
    assert hub.hub_token_found()
    hub_env.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # the saved token is HF_HOME's
    assert not hub.hub_token_found()
    hub_env.setenv("HF_TOKEN_PATH", str(token))
    assert hub.hub_token_found()
    hub_env.delenv("HF_TOKEN_PATH")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        hub_env.setenv(name, "hf_x")
        assert hub.hub_token_found()
        hub_env.delenv(name)


@pytest.mark.parametrize("reachable, cached", [(True, False), (False, True), (False, False)])
def test_the_hub_out_of_reach_loads_from_the_cache_or_fails_in_one_line(monkeypatch, reachable, cached):
    asked = []
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None if reachable else "http://127.0.0.1:9 cannot be reached")
    monkeypatch.setattr(hub, "in_hub_cache", lambda repo_id, filename: asked.append((repo_id, filename)) or cached)
    if reachable or cached:
        assert hub.hub_files_only("org/clip", "CLIP model org/clip", "config.json", hint="h") is (not reachable)
        assert asked == ([] if reachable else [("org/clip", "config.json")])  # the Hub answers: the cache is not read
        return
    with pytest.raises(Sd3tuneError) as info:
        hub.model_files_only("org/sd3", "pass --model PATH to a local diffusers folder")
    assert asked == [("org/sd3", "model_index.json")]
    assert info.value.message == ("cannot load org/sd3: it is not in the local Hugging Face cache and the Hub is out "
                                  "of reach: http://127.0.0.1:9 cannot be reached")
    assert info.value.hint == ("download it once where the Hub is reachable (`hf download org/sd3`; gated models need "
                               "`hf auth login` and accepted terms), or pass --model PATH to a local diffusers folder")


def test_offline_mode_is_out_of_reach_without_a_request(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at the library's import
    assert hub.hub_unreachable() == "offline mode is on (HF_HUB_OFFLINE)"


def test_an_invalid_repo_id_is_not_in_the_cache():
    assert hub.in_hub_cache("not a repo id!") is False


def test_checks_and_the_loaders_agree_on_what_is_cached(hub_env, tmp_path):
    # hub.cached_snapshot (for `check`, no huggingface_hub import) and in_hub_cache (huggingface_hub's own lookup,
    # before a load) read the same snapshot
    from huggingface_hub import try_to_load_from_cache

    cache = tmp_path / "cache"
    snapshot = cache / "models--org--model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (cache / "models--org--model" / "refs").mkdir()
    (cache / "models--org--model" / "refs" / "main").write_text("0" * 40)
    hub_env.setenv("HF_HUB_CACHE", str(cache))
    assert hub.cached_snapshot("org/model")
    assert Path(try_to_load_from_cache("org/model", "model_index.json", cache_dir=hub.hub_cache_dir())) == \
        snapshot / "model_index.json"
