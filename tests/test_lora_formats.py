"""sd3tune.lora_formats on small synthetic LoRAs: the kohya fusion of q/k/v (all three, a part missing, parts of
other strengths), the deltas each client computes, and the check that refuses an export that changes or drops a
layer. No model loads, nothing trains; the real trained LoRA is checked in test_export.py."""

from __future__ import annotations

import json

import pytest
import torch

from sd3tune.errors import Sd3tuneError
from sd3tune.lora import LORA_ADAPTER_METADATA
from sd3tune.lora_formats import (diffusers_deltas, kohya_deltas, mmdit_target, original_deltas, to_diffusers,
                                  to_kohya, trained_scales, verify)

HIDDEN = 8


def pairs(*layers: str, rank: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"transformer_blocks.0.{layer}": (torch.randn(rank, HIDDEN, generator=g),
                                              torch.randn(HIDDEN, rank, generator=g)) for layer in layers}


def test_every_trained_sd3_layer_has_its_kohya_key():
    assert mmdit_target("transformer_blocks.3.attn.to_k") == ("lora_unet_joint_blocks_3_x_block_attn_qkv", 1)
    assert mmdit_target("transformer_blocks.3.attn.add_v_proj") == ("lora_unet_joint_blocks_3_context_block_attn_qkv", 2)
    assert mmdit_target("transformer_blocks.0.attn.to_add_out") == ("lora_unet_joint_blocks_0_context_block_attn_proj",
                                                                     None)
    assert mmdit_target("transformer_blocks.0.ff_context.net.2")[0] == "lora_unet_joint_blocks_0_context_block_mlp_fc2"
    with pytest.raises(Sd3tuneError, match="transformer.transformer_blocks.0.norm1.linear has no kohya SD3 key"):
        mmdit_target("transformer_blocks.0.norm1.linear")


@pytest.mark.parametrize("layers", [("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj"),
                                    ("attn.to_q", "attn.to_v"),  # k not trained: its third adds nothing
                                    ("attn.add_k_proj", "attn.to_add_out", "ff_context.net.2")])
def test_the_kohya_export_merges_to_the_trained_deltas(layers):
    lora = pairs(*layers)
    scales = dict.fromkeys(lora, 0.25)
    tensors, meta = to_kohya(lora, {"sd3tune.lora_rank": "2", "sd3tune.lora_alpha": "0.5"}, scales)
    original = original_deltas(lora, scales)
    exported = kohya_deltas(tensors)
    assert verify("kohya", original, exported) <= 1e-12
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    if f"{qkv}.alpha" in tensors:  # alpha / rows of the fused down = the trained 0.25
        assert float(tensors[f"{qkv}.alpha"]) / tensors[f"{qkv}.lora_down.weight"].shape[0] == 0.25
    assert meta["ss_network_dim"] == "2" and meta["ss_network_module"] == "networks.lora_sd3"


def test_qkv_parts_of_different_strengths_are_folded_exactly():
    lora = pairs("attn.to_q", "attn.to_k", "attn.to_v")
    scales = dict(zip(lora, (0.25, 0.5, 1.0)))
    tensors, _ = to_kohya(lora, {}, scales)
    assert verify("kohya", original_deltas(lora, scales), kohya_deltas(tensors)) <= 1e-12


def test_the_check_refuses_a_changed_or_missing_delta():
    lora = pairs("attn.to_q", "attn.to_out.0")
    original = original_deltas(lora, dict.fromkeys(lora, 0.25))
    wrong = original_deltas(lora, dict.fromkeys(lora, 1.0))  # alpha taken as rank
    with pytest.raises(Sd3tuneError, match=r"changes transformer.transformer_blocks.0.attn.to_\S+'s merged delta"):
        verify("kohya", original, wrong)
    with pytest.raises(Sd3tuneError, match="would drop transformer.transformer_blocks.0.attn.to_out.0"):
        verify("kohya", original, {k: v for k, v in original.items() if "to_q" in k})
    extra = {**original, "transformer_blocks.0.attn.to_k": torch.ones(HIDDEN, HIDDEN, dtype=torch.float64)}
    with pytest.raises(Sd3tuneError, match="adds a delta to transformer.transformer_blocks.0.attn.to_k"):
        verify("kohya", original, extra)


def test_a_kohya_file_missing_its_alpha_is_refused():
    lora = pairs("attn.to_out.0")
    tensors, _ = to_kohya(lora, {}, dict.fromkeys(lora, 1.0))
    del tensors["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]
    with pytest.raises(Sd3tuneError, match=r"lacks \['alpha'\]"):
        kohya_deltas(tensors)


def test_the_diffusers_export_scales_as_peft_does_and_keeps_a_checkpoints_config(tmp_path):
    lora = pairs("attn.to_q", "attn.to_out.0", rank=4)
    tensors, meta = to_diffusers(lora, {"sd3tune.lora_rank": "4", "sd3tune.lora_alpha": "1.0"},
                                 dict.fromkeys(lora, 0.25))
    scales = trained_scales("f", meta, list(lora))
    assert set(scales.values()) == {0.25}
    assert verify("diffusers", original_deltas(lora, scales), diffusers_deltas("f", tensors, meta)) == 0.0
    peft = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.target_modules": ["to_q"],
            "transformer.alpha_pattern": {"to_out.0": 2}}  # to_out.0 is not targeted: diffusers drops it
    kept = to_diffusers(lora, {LORA_ADAPTER_METADATA: json.dumps(peft)}, dict.fromkeys(lora, 1.0))[1]
    assert json.loads(kept[LORA_ADAPTER_METADATA]) == peft
    with pytest.raises(Sd3tuneError, match="would drop 'transformer_blocks.0.attn.to_out.0'"):
        diffusers_deltas("f", tensors, kept)
    assert trained_scales("f", kept, list(lora)) == {"transformer_blocks.0.attn.to_q": 1.0,
                                                      "transformer_blocks.0.attn.to_out.0": 0.5}


def test_a_lora_that_records_no_strength_or_another_family_is_refused():
    with pytest.raises(Sd3tuneError, match="records no alpha or rank"):
        trained_scales("f", {}, ["transformer_blocks.0.attn.to_q"])
    with pytest.raises(Sd3tuneError, match="trained for 'flux'"):
        trained_scales("f", {"sd3tune.model_family": "flux", "sd3tune.lora_rank": "4", "sd3tune.lora_alpha": "4"}, [])
