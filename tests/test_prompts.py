"""sd3tune.prompts: reading a prompts file and the prompts `evaluate` chooses from the run. (Neutral marks, a BOM and a
folder passed as the file are covered in test_evaluate.py.)"""

from __future__ import annotations

import pytest

from sd3tune.errors import Sd3tuneError
from sd3tune.prompts import (CAPTION_PROMPTS, NEUTRAL_PROMPTS, EvalPrompt, default_prompts, distinct_prompts,
                             read_prompts_file)


def test_a_missing_or_undecodable_prompts_file_is_one_error_with_a_hint(tmp_path):
    with pytest.raises(Sd3tuneError) as info:
        read_prompts_file(tmp_path / "missing.txt", trigger=None)
    assert info.value.message == f"prompts file {tmp_path / 'missing.txt'} does not exist"
    assert info.value.hint == "one prompt per line; prefix neutral prompts with 'neutral:'"
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(Sd3tuneError) as info:
        read_prompts_file(latin, trigger=None)
    assert (info.value.message, info.value.hint) == (f"prompts file {latin} is not UTF-8 text", "one prompt per line")


def test_the_neutral_mark_is_any_case_and_a_bare_mark_is_no_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("NEUTRAL: a red apple\nneutral:\n  Myst, a tower  \n", encoding="utf-8")
    assert read_prompts_file(path, trigger="myst") == [EvalPrompt("a red apple", "neutral"),
                                                      EvalPrompt("Myst, a tower", "concept")]  # the trigger in any case


def test_repeats_keep_the_first_place_and_kind():
    prompts = [EvalPrompt("a", "concept"), EvalPrompt("b", "neutral"), EvalPrompt("a", "neutral"),
               EvalPrompt("b", "neutral")]
    assert distinct_prompts(prompts) == ([EvalPrompt("a", "concept"), EvalPrompt("b", "neutral")], 2)
    assert distinct_prompts([]) == ([], 0)


def test_default_prompts_take_evenly_spaced_distinct_captions_after_the_validation_prompt():
    captions = [f"myst, picture {i}" for i in range(12)] + ["  myst,   picture 0 ", "", "   ", "myst, a castle"]
    prompts = default_prompts("myst, a castle", captions, "myst")
    concept = [p.text for p in prompts if p.kind == "concept"]
    assert concept == ["myst, a castle", "myst, picture 0", "myst, picture 4", "myst, picture 8"]
    assert len(concept) == 1 + CAPTION_PROMPTS
    assert [p.text for p in prompts if p.kind == "neutral"] == list(NEUTRAL_PROMPTS)
    assert [p.text for p in default_prompts(None, ["a dog"], None) if p.kind == "concept"] == ["a dog"]
    assert [p.text for p in default_prompts("myst, a castle", ["a dog"], None, n_captions=0)
            if p.kind == "concept"] == ["myst, a castle"]  # no caption asked for
    assert [p.text for p in default_prompts(None, [], "myst") if p.kind == "concept"] == ["myst"]  # the trigger alone


def test_a_run_with_nothing_to_build_concept_prompts_from_says_so():
    with pytest.raises(Sd3tuneError) as info:
        default_prompts(None, ["", "  "], None)
    assert info.value.message == ("the run has no validation prompt, captions or trigger word to build concept prompts "
                                  "from")
    assert info.value.hint == "pass --prompts FILE (one prompt per line)"


def test_a_neutral_prompt_that_is_also_a_caption_counts_once_as_a_concept():
    prompts = default_prompts(None, [NEUTRAL_PROMPTS[0]], None)
    assert [(p.text, p.kind) for p in prompts][:2] == [(NEUTRAL_PROMPTS[0], "concept"), (NEUTRAL_PROMPTS[1], "neutral")]
    assert len(prompts) == len(NEUTRAL_PROMPTS)
