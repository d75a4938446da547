"""The LoRA formats `sd3tune export` writes, each verified before it is written.

- ``diffusers``: SimpleTuner's PEFT keys (``transformer.transformer_blocks.N.attn.to_q.lora_A.weight``) with the peft
  config diffusers builds the adapter from (``lora_adapter_metadata``: ``r``, ``lora_alpha``, target modules), so
  ``load_lora_weights`` applies the trained strength alpha / rank by itself.
- ``kohya``: the keys of kohya-ss/sd-scripts' SD3 LoRA network, which ComfyUI, Forge and A1111 also read:
  ``lora_unet_joint_blocks_N_{x_block,context_block}_{attn_qkv,attn_proj,mlp_fc1,mlp_fc2}`` with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``. The rules, from the sources at kohya-ss/sd-scripts 48d368fa557731ad0488c07304dfe
  ba8c07910eb (networks/lora_sd3.py: names are ``lora_unet_`` + the MMDiT module path with ``_`` for ``.``; a LoRA's
  rank is the rows of its ``lora_down``, its scale ``alpha / rank``, alpha mandatory; ``state_dict`` with split_qkv
  fuses q/k/v as down = concat of the three downs, up = block diagonal of the three ups) and Comfy-Org/ComfyUI
  a125cd84b054a57729b5eecab930ca9408719832 (comfy/lora.py ``model_lora_keys_unet``: ``lora_unet_`` + the MMDiT weight
  path; comfy/weight_adapter/lora.py: scale ``alpha / lora_down.shape[0]``; comfy/utils.py ``mmdit_to_diffusers`` and
  ``MMDIT_MAP_BLOCK``: which diffusers layer is which MMDiT module, q/k/v as row thirds of ``qkv``). A fused qkv LoRA
  has 3 × rank rows in its down, so its alpha is 3 × the trained alpha: alpha / rows stays the trained alpha / rank.
- ``comfyui``: the kohya file. ComfyUI reads SimpleTuner's PEFT keys too, but a PEFT file carries no ``.alpha``
  tensor, so ComfyUI applies it at alpha = rank (strength 1: 4× too strong for rank 16, alpha 4); the kohya file's
  ``.alpha`` is read by ComfyUI's own LoRA loader, which divides it by the rows of ``lora_down``: the trained strength.

Every export is checked before it is written: the merged delta ``scale · up @ down`` of each target weight,
recomputed from the exported tensors the way its client does (peft's config for diffusers, alpha / rows for kohya),
equals the original's ``alpha / rank · B @ A`` (max abs error ≤ 1e-5 of the largest entry), and no key is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sd3tune.errors import Sd3tuneError
from sd3tune.lora import LORA_KEY, LORA_ADAPTER_METADATA, adapter_metadata

KOHYA_PREFIX = "lora_unet_"
TOLERANCE = 1e-5  # max abs error of a merged delta, relative to its largest entry
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(repo) looks for
NOT_OURS = "export a LoRA trained by `sd3tune train` (its stamp records alpha and rank)"

# A diffusers SD3 layer (in transformer_blocks.N) -> the MMDiT module (in joint_blocks.N) and, for q/k/v, which third
# of that module's fused qkv rows it is (comfy/utils.py mmdit_to_diffusers, MMDIT_MAP_BLOCK).
DIFFUSERS_TO_MMDIT: dict[str, tuple[str, int | None]] = {
    **{f"attn.to_{p}": ("x_block.attn.qkv", i) for i, p in enumerate("qkv")},
    "attn.to_out.0": ("x_block.attn.proj", None),
    **{f"attn.add_{p}_proj": ("context_block.attn.qkv", i) for i, p in enumerate("qkv")},
    "attn.to_add_out": ("context_block.attn.proj", None),
    **{f"attn2.to_{p}": ("x_block.attn2.qkv", i) for i, p in enumerate("qkv")},  # SD3.5's second image attention
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
}
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_KOHYA = re.compile(rf"{KOHYA_PREFIX}joint_blocks_(\d+)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")


# ----------------------------------------------------------------------------------------------- the source LoRA


def load_tensors(file) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def lora_pairs(file, tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Layer name (in the transformer) -> (lora_A, lora_B) of a PEFT-keyed SD3 LoRA."""
    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        m = LORA_KEY.fullmatch(name)
        if m is None:
            raise Sd3tuneError(f"{file} has {name!r}, which is not a LoRA weight of the diffusers format", hint=NOT_OURS)
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    for layer, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise Sd3tuneError(f"{file} has no lora_{missing} for {layer}", hint=NOT_OURS)
    return {layer: (ab["A"], ab["B"]) for layer, ab in pairs.items()}


def trained_scales(file, metadata: dict[str, str], layers: list[str]) -> dict[str, float]:
    """Each layer's trained strength (alpha / rank) from what the file records: sd3tune's stamp, else the peft config
    SimpleTuner writes into its checkpoints. A file with neither (not made by sd3tune) is refused: exporting it
    would fix a strength nobody knows."""
    family = metadata.get("sd3tune.model_family", "sd3")
    if family != "sd3":
        raise Sd3tuneError(f"{file} was trained for {family!r}, not SD3", hint=NOT_OURS)
    if "sd3tune.lora_alpha" in metadata and "sd3tune.lora_rank" in metadata:
        scale = float(metadata["sd3tune.lora_alpha"]) / float(metadata["sd3tune.lora_rank"])
        return dict.fromkeys(layers, scale)
    if LORA_ADAPTER_METADATA in metadata:
        config = peft_config(file, metadata)
        return {layer: peft_scale(config, layer) for layer in layers}
    raise Sd3tuneError(f"{file} records no alpha or rank (no sd3tune stamp, no lora_adapter_metadata): its "
                       "strength is unknown", hint=NOT_OURS)


def peft_config(file, metadata: dict[str, str]):
    """The peft LoraConfig diffusers builds from the file's ``lora_adapter_metadata`` (its ``transformer.`` keys)."""
    from peft import LoraConfig

    try:
        raw = json.loads(metadata[LORA_ADAPTER_METADATA])
        return LoraConfig(**{k.removeprefix("transformer."): v for k, v in raw.items() if k.startswith("transformer.")})
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise Sd3tuneError(f"{file} has a lora_adapter_metadata diffusers cannot read ({exc})", hint=NOT_OURS) from None


def peft_scale(config, layer: str) -> float:
    """The factor peft puts on ``B @ A`` of ``layer`` (peft 0.21 LoraLayer.update_layer: the rank_pattern /
    alpha_pattern entry that matches the layer, else r / lora_alpha; rsLoRA divides by sqrt(r))."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), layer), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), layer), config.lora_alpha)
    return alpha / (r ** 0.5 if config.use_rslora else r)


def original_deltas(pairs: dict[str, tuple[Any, Any]], scales: dict[str, float]) -> dict[str, Any]:
    """Layer -> ``alpha / rank · B @ A`` (float64): what the trained LoRA adds to each weight."""
    return {layer: scales[layer] * (b.double() @ a.double()) for layer, (a, b) in pairs.items()}


# ----------------------------------------------------------------------------------------------- diffusers


def to_diffusers(pairs: dict[str, tuple[Any, Any]], metadata: dict[str, str], scales: dict[str, float]):
    """The PEFT-keyed tensors and metadata with the peft config diffusers reads (kept when the file has one)."""
    tensors = {}
    for layer, (a, b) in pairs.items():
        tensors[f"transformer.{layer}.lora_A.weight"], tensors[f"transformer.{layer}.lora_B.weight"] = a, b
    meta = {**metadata, "format": "pt"}
    if LORA_ADAPTER_METADATA not in meta:
        ranks = {a.shape[0] for a, _ in pairs.values()}
        strengths = set(scales.values())
        if len(ranks) != 1 or len(strengths) != 1:
            raise Sd3tuneError("the LoRA's layers have different ranks or strengths; one peft config cannot say so",
                               hint=NOT_OURS)
        rank = ranks.pop()
        meta[LORA_ADAPTER_METADATA] = adapter_metadata(rank, strengths.pop() * rank, tensors)
    return tensors, meta


def diffusers_deltas(file, tensors: dict[str, Any], metadata: dict[str, str]) -> dict[str, Any]:
    """The merged deltas diffusers applies from a PEFT-keyed file: peft's config from ``lora_adapter_metadata``; a
    layer its target modules do not name gets no adapter (diffusers drops its keys with a warning): an error."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft_config(file, metadata)
    deltas = {}
    for layer, (a, b) in lora_pairs(file, tensors).items():
        if not check_target_module_exists(config, layer):
            raise Sd3tuneError(f"the diffusers export would drop {layer!r}: its peft config does not target it",
                               hint=NOT_OURS)
        deltas[layer] = peft_scale(config, layer) * (b.double() @ a.double())
    return deltas


# ----------------------------------------------------------------------------------------------- kohya


def mmdit_target(layer: str) -> tuple[str, int | None]:
    """The kohya LoRA name of a diffusers SD3 layer and its third of a fused qkv (None: the whole module); a layer
    that has no kohya key is an error naming it, never dropped."""
    m = _BLOCK.fullmatch(layer)
    target = DIFFUSERS_TO_MMDIT.get(m.group(2)) if m else None
    if m is None or target is None:
        raise Sd3tuneError(f"transformer.{layer} has no kohya SD3 key: the kohya export would drop it",
                           hint="export it with --format diffusers")
    module, part = target
    return f"{KOHYA_PREFIX}joint_blocks_{m.group(1)}_{module.replace('.', '_')}", part


def to_kohya(pairs: dict[str, tuple[Any, Any]], metadata: dict[str, str], scales: dict[str, float]):
    """sd-scripts' SD3 keys: q/k/v fused into one ``qkv`` LoRA (down = their downs stacked, up = block diagonal, alpha
    = the trained strength × the rows of the down); each other layer as it is, with alpha = strength × rank. Parts
    with another strength than the first of their qkv have it folded into their up rows."""
    import torch

    groups: dict[str, dict[int | None, tuple[Any, Any, float]]] = {}
    for layer, (a, b) in pairs.items():
        name, part = mmdit_target(layer)
        groups.setdefault(name, {})[part] = (a, b, scales[layer])
    tensors: dict[str, Any] = {}
    for name, parts in sorted(groups.items()):
        if None in parts:
            a, b, scale = parts[None]
            down, up, strength = a, b, scale
        else:
            order = sorted(parts)
            strength = parts[order[0]][2]
            rows = parts[order[0]][1].shape[0]  # each third of qkv: the hidden size
            down = torch.cat([parts[i][0] for i in order])
            up = torch.zeros(3 * rows, down.shape[0], dtype=down.dtype)
            col = 0
            for i in order:
                a, b, scale = parts[i]
                up[i * rows:(i + 1) * rows, col:col + a.shape[0]] = b if scale == strength else b * (scale / strength)
                col += a.shape[0]
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(strength * down.shape[0], dtype=torch.float32)
    meta = {k: v for k, v in metadata.items() if k.startswith(("sd3tune.", "ss_", "modelspec."))}
    meta.update({"format": "pt", "ss_network_module": "networks.lora_sd3",
                 "modelspec.architecture": "stable-diffusion-3-medium/lora",
                 "modelspec.implementation": "https://github.com/Stability-AI/generative-models"})
    if "sd3tune.lora_rank" in metadata:
        meta.update({"ss_network_dim": metadata["sd3tune.lora_rank"], "ss_network_alpha": metadata["sd3tune.lora_alpha"]})
    return tensors, meta


def kohya_deltas(tensors: dict[str, Any]) -> dict[str, Any]:
    """The merged deltas ComfyUI and sd-scripts apply from a kohya-keyed file (scale = alpha / rows of lora_down),
    mapped back onto the diffusers layers (q/k/v: row thirds of qkv). A key they would not read is an error."""
    mmdit_to_layer = {(module.replace(".", "_"), part): layer for layer, (module, part) in DIFFUSERS_TO_MMDIT.items()}
    names: dict[tuple[str, str], set[str]] = {}
    for key in tensors:
        m = _KOHYA.fullmatch(key)
        if m is None or not any(module == m.group(2) for module, _ in mmdit_to_layer):
            raise Sd3tuneError(f"the kohya export would drop {key!r}: no SD3 kohya loader reads it")
        names.setdefault((m.group(1), m.group(2)), set()).add(m.group(3))
    deltas = {}
    for (block, module), parts in names.items():
        if parts != {"lora_down.weight", "lora_up.weight", "alpha"}:
            raise Sd3tuneError(f"the kohya export's {module} in block {block} lacks "
                               f"{sorted({'lora_down.weight', 'lora_up.weight', 'alpha'} - parts)}")
        key = f"{KOHYA_PREFIX}joint_blocks_{block}_{module}"
        down, up = tensors[f"{key}.lora_down.weight"].double(), tensors[f"{key}.lora_up.weight"].double()
        full = (float(tensors[f"{key}.alpha"]) / down.shape[0]) * (up @ down)
        if (module, None) in mmdit_to_layer:
            deltas[f"transformer_blocks.{block}.{mmdit_to_layer[module, None]}"] = full
        else:
            for i, third in enumerate(full.chunk(3)):
                deltas[f"transformer_blocks.{block}.{mmdit_to_layer[module, i]}"] = third
    return deltas


# ----------------------------------------------------------------------------------------------- the check


def verify(what: str, original: dict[str, Any], exported: dict[str, Any]) -> float:
    """Every trained layer's merged delta in ``exported`` equals ``original``'s (max abs error ≤ TOLERANCE of its
    largest entry); a layer the export adds must add nothing (a qkv third no LoRA trained). Returns the largest
    relative error."""
    worst = 0.0
    for layer, delta in original.items():
        if layer not in exported:
            raise Sd3tuneError(f"the {what} export would drop transformer.{layer}")
        got = exported[layer]
        if got.shape != delta.shape:
            raise Sd3tuneError(f"the {what} export changes the shape of transformer.{layer}: {tuple(delta.shape)} -> "
                               f"{tuple(got.shape)}")
        error = float((got - delta).abs().max()) / max(float(delta.abs().max()), 1e-30)
        if error > TOLERANCE:
            raise Sd3tuneError(f"the {what} export changes transformer.{layer}'s merged delta by {error:.2e} of its "
                               "largest entry; nothing was written")
        worst = max(worst, error)
    for layer in set(exported) - set(original):
        if float(exported[layer].abs().max()) != 0.0:
            raise Sd3tuneError(f"the {what} export adds a delta to transformer.{layer}, which the LoRA did not train")
    return worst
