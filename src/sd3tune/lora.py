"""A LoRA file: its safetensors header, sd3tune's stamp (the training settings, written into the file) and the history
of a resumed training, and which file a run, output or checkpoint folder names. Used by train (stamping), check
--resume, generate and evaluate.

Only the standard library at import time (`sd3tune check` reads stamps): safetensors and torch load inside the
functions that rewrite a file, sd3tune's config and SimpleTuner modules inside those that read a run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any

from sd3tune import __version__
from sd3tune.errors import Sd3tuneError

if TYPE_CHECKING:
    from sd3tune.config.models import RunConfig
    from sd3tune.simpletuner.loaded import LoadedRun

# safetensors metadata key holding a LoRA's peft config (lora_alpha, r, ...); diffusers configures the adapter from it,
# so peft then scales the LoRA by lora_alpha / r by itself. SimpleTuner 4.10 writes it into checkpoint-N files only.
LORA_ADAPTER_METADATA = "lora_adapter_metadata"

# The LoRA stamp (safetensors metadata, "sd3tune.*"): how it trained, so it samples as it trained wherever it is copied.
HISTORY_KEY = "sd3tune.history"
SETTING_LABELS = {  # stamped training settings -> how a message names them
    "sd3tune.base_model": "base model", "sd3tune.model_family": "model family", "sd3tune.lora_rank": "LoRA rank",
    "sd3tune.lora_alpha": "LoRA alpha", "sd3tune.t5_max_length": "T5 length",
    "sd3tune.flow_schedule_shift": "schedule shift", "sd3tune.resolution": "resolution",
    "sd3tune.resolution_type": "resolution type",
}


@dataclass
class LoraSource:
    """A LoRA file and, when it came from a run, the run's training settings."""

    file: Path
    config: RunConfig | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    # What trained this file comes first: sd3tune's stamp (written into the final LoRA when training finished), then
    # the peft config SimpleTuner writes into each checkpoint (``lora_adapter_metadata``), and only then the run's
    # config, which may have been edited since.

    @property
    def alpha_over_rank(self) -> float:
        """The LoRA's alpha / rank as it was trained (1 when nothing says)."""
        if "sd3tune.lora_alpha" in self.metadata and "sd3tune.lora_rank" in self.metadata:
            return float(self.metadata["sd3tune.lora_alpha"]) / float(self.metadata["sd3tune.lora_rank"])
        try:
            peft = json.loads(self.metadata.get(LORA_ADAPTER_METADATA, "{}"))
            return float(peft["transformer.lora_alpha"]) / float(peft["transformer.r"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError):
            pass
        if self.config is not None:
            return self.config.lora.effective_alpha / self.config.lora.rank
        return 1.0

    @cached_property
    def sha256(self) -> str:
        """The file's SHA-256: outputs record it, since a retrain replaces the file at the same path."""
        from sd3tune.fsutil import file_sha256

        return file_sha256(self.file)

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("sd3tune.base_model") or (self.config.model.name_or_path if self.config else None)

    @property
    def schedule_shift(self) -> float | None:
        if "sd3tune.flow_schedule_shift" in self.metadata:
            return float(self.metadata["sd3tune.flow_schedule_shift"])
        return self.config.timesteps.schedule_shift if self.config else None

    @property
    def later_checkpoint(self) -> Path | None:
        """For a run's final LoRA: a checkpoint LoRA beside it with more steps, left by a later training (resumed,
        then interrupted or failed), which the run's LoRA is not."""
        from sd3tune.simpletuner.layout import checkpoint_step

        steps = self.metadata.get("sd3tune.steps", "")
        if checkpoint_step(self.file.parent) is not None or not steps.isdigit():
            return None
        later = [f for f in checkpoint_loras(self.file.parent) if (checkpoint_step(f.parent) or 0) > int(steps)]
        return later[-1] if later else None

    @property
    def square_side(self) -> int | None:
        """The side of the square images the LoRA was trained at (None for an area resolution: SD3's 1024 then)."""
        if "sd3tune.resolution" in self.metadata:
            if self.metadata.get("sd3tune.resolution_type", "pixel") == "area":
                return None
            return int(float(self.metadata["sd3tune.resolution"]))
        if self.config is not None and self.config.data.resolution_type != "area":
            return int(self.config.data.resolution)
        return None


# ----------------------------------------------------------------------------------------------- finding the file


def checkpoint_loras(output_dir: Path) -> list[Path]:
    """The LoRA file of each checkpoint-N folder that holds one, by step."""
    from sd3tune.simpletuner import keys
    from sd3tune.simpletuner.layout import checkpoints

    return [p / keys.LORA_WEIGHT_NAME for p in checkpoints(output_dir) if (p / keys.LORA_WEIGHT_NAME).is_file()]


def latest_lora_in(output_dir: Path) -> Path | None:
    from sd3tune.simpletuner import keys

    final = output_dir / keys.LORA_WEIGHT_NAME
    if final.is_file():
        return final
    ckpts = checkpoint_loras(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_lora(spec: Path, run: LoadedRun | None = None) -> LoraSource:
    """Accept a run folder, an output/checkpoint folder, or a .safetensors file. The training settings come from
    ``run`` when the caller has read it already, else from the run folder at or above ``spec``."""
    from sd3tune.simpletuner import keys
    from sd3tune.simpletuner.layout import find_run_root
    from sd3tune.simpletuner.reader import read_run

    spec = spec.expanduser()
    if not spec.exists():
        raise Sd3tuneError(f"LoRA {spec} does not exist", hint="pass a run folder, a checkpoint folder or a .safetensors file")
    root = run.paths.root if run is not None else find_run_root(spec if spec.is_dir() else spec.parent)
    if run is None and root is not None:
        run = read_run(root)
    if spec.is_dir():
        if run is not None and spec.resolve() == root.resolve():  # the run folder: its OUTPUT_DIR, wherever it is
            output_dir = run.output_dir() or spec / "output"
            if (file := latest_lora_in(output_dir)) is None:
                raise Sd3tuneError(f"no {keys.LORA_WEIGHT_NAME} under {output_dir}: the run is not trained yet",
                                   hint=f"train it first: `sd3tune train {quote(str(spec))}`")
        elif (file := latest_lora_in(spec)) is None:
            raise Sd3tuneError(f"no {keys.LORA_WEIGHT_NAME} under {spec}",
                               hint="train first (`sd3tune train RUN_DIR`), or pass the .safetensors file")
    else:
        file = spec
    metadata, tensors = read_safetensors_header(file)
    check_lora_keys(file, tensors)  # from the header alone: a file that is no LoRA fails before any model loads
    return LoraSource(file=file.resolve(), config=run.config if run is not None else None, metadata=metadata)


# ----------------------------------------------------------------------------------------------- the file


def read_safetensors_header(file: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The safetensors header: (``__metadata__``, tensor name -> dtype/shape), reading only the header."""
    import struct

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA")
    return dict(header.get("__metadata__") or {}), {k: v for k, v in header.items() if k != "__metadata__"}


def safetensors_metadata(file: Path) -> dict[str, str] | None:
    """A safetensors file's metadata (a LoRA's sd3tune stamp); None for a file that is missing, unreadable or not
    safetensors (a checkpoint cut short)."""
    try:
        return read_safetensors_header(file)[0] if file.is_file() else None
    except (Sd3tuneError, OSError):
        return None


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors (names, dtypes, shapes and bytes), whatever their metadata
    (the final LoRA carries sd3tune's stamp, a checkpoint SimpleTuner's) and tensor order. Stops at the first
    difference, so a different checkpoint costs one tensor read. An unreadable file counts as different."""
    import struct

    try:
        _, ta = read_safetensors_header(a)
        _, tb = read_safetensors_header(b)
        if {k: (v["dtype"], v["shape"]) for k, v in ta.items()} != {k: (v["dtype"], v["shape"]) for k, v in tb.items()}:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            starts = [8 + struct.unpack("<Q", f.read(8))[0] for f in (fa, fb)]
            for name in sorted(ta):
                chunks = []
                for f, start, info in ((fa, starts[0], ta[name]), (fb, starts[1], tb[name])):
                    begin, end = info["data_offsets"]
                    f.seek(start + begin)
                    chunks.append(f.read(end - begin))
                if chunks[0] != chunks[1]:
                    return False
        return True
    except (Sd3tuneError, OSError, KeyError, TypeError, ValueError, struct.error):
        return False


LORA_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")


def check_lora_keys(file: Path, tensors: dict[str, Any]) -> None:
    """Refuse a file whose tensor names (``tensors``: its safetensors header) are not those of an SD3 transformer
    LoRA in the diffusers format, e.g. a CLIP or UNet checkpoint, or a kohya-format LoRA. Needs no model."""
    names = list(tensors)
    if not names or not all(n.startswith("transformer.") for n in names):
        other = next((n for n in names if not n.startswith("transformer.")), "no tensors")
        raise Sd3tuneError(f"{file} is not an SD3 transformer LoRA (found key {other!r})",
                           hint="use a LoRA trained for SD3 with sd3tune/SimpleTuner")
    for name in names:
        if LORA_KEY.fullmatch(name) is None:
            raise Sd3tuneError(f"{file} has {name!r}, which is not a LoRA weight of the diffusers format",
                               hint="use a LoRA trained for SD3 with sd3tune/SimpleTuner")


def check_lora_fits(file: Path, transformer: Any) -> None:
    """Refuse a LoRA whose keys or shapes do not belong to this SD3 ``transformer`` (loaded): diffusers would drop
    keys it cannot place (a partial LoRA, silently) or fail deep inside peft on a shape."""
    _, tensors = read_safetensors_header(file)
    check_lora_keys(file, tensors)
    another = "the LoRA was trained for another model; pass the right --model"
    layers = transformer.config["num_layers"]
    for name, info in tensors.items():
        block = re.search(r"transformer_blocks\.(\d+)\.", name)
        if block and int(block.group(1)) >= layers:
            raise Sd3tuneError(f"{file} has block {block.group(1)} but this model has {layers} blocks", hint=another)
        m = LORA_KEY.fullmatch(name)
        assert m is not None  # check_lora_keys
        try:
            layer = transformer.get_submodule(m.group(1))
        except AttributeError:
            raise Sd3tuneError(f"{file} has a LoRA for {m.group(1)}, a layer this model does not have",
                               hint=another) from None
        side = "input" if m.group(2) == "A" else "output"  # lora_A is (rank, in), lora_B (out, rank)
        wanted = getattr(layer, "in_features" if side == "input" else "out_features", None)
        shape = info["shape"]
        got = (shape[1] if side == "input" else shape[0]) if len(shape) == 2 else shape
        if got != wanted:
            raise Sd3tuneError(f"{file} was trained for a layer {m.group(1)} with {side} width {got}; this model's "
                               f"has {wanted}", hint=another)


# ----------------------------------------------------------------------------------------------- the stamp


def lora_settings(cfg: RunConfig, backends: list[Any]) -> dict[str, str]:
    """The training settings a LoRA's stamp records (``SETTING_LABELS``' keys), from the validated run."""
    from sd3tune.simpletuner.backends import ImageBackend
    from sd3tune.simpletuner import keys

    # the resolution the images train at: the (first) dataset's, which SimpleTuner uses over RESOLUTION
    trained = next((b.effective(cfg.data) for b in backends if isinstance(b, ImageBackend) and not b.disabled),
                   cfg.data)
    return {
        "sd3tune.base_model": cfg.model.name_or_path, "sd3tune.model_family": cfg.model.family,
        "sd3tune.lora_rank": str(cfg.lora.rank), "sd3tune.lora_alpha": repr(cfg.lora.effective_alpha),
        "sd3tune.t5_max_length": str(keys.SD3_T5_MAX_LENGTH),
        "sd3tune.flow_schedule_shift": repr(cfg.timesteps.schedule_shift),
        "sd3tune.resolution": str(trained.resolution), "sd3tune.resolution_type": trained.resolution_type,
    }


def training_stamp(cfg: RunConfig, backends: list[Any], run_root: Path, resumed_from: Path | None) -> dict[str, str]:
    """The stamp of a training's LoRA and checkpoints: sd3tune's version, the training settings and the run folder;
    for a training resumed from the checkpoint folder ``resumed_from``, also what trained before (``HISTORY_KEY``)."""
    from sd3tune.simpletuner import keys

    stamp = {"sd3tune.version": __version__, **lora_settings(cfg, backends), "sd3tune.run_dir": str(run_root.resolve())}
    if resumed_from is not None:
        earlier = safetensors_metadata(resumed_from / keys.LORA_WEIGHT_NAME) or {}
        stamp[HISTORY_KEY] = resumed_history(resumed_from, earlier)
    return stamp


def at_step(stamp: dict[str, str], steps: int | None) -> dict[str, str]:
    """``stamp`` for the weights saved after ``steps`` steps, now."""
    from sd3tune.manifest import now

    return {**stamp, "sd3tune.steps": str(steps), "sd3tune.trained_at": now()}


def stamp_lora(lora: Path, metadata: dict[str, str]) -> None:
    """Add sd3tune provenance to the LoRA's safetensors header (atomic rewrite, tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save

    from sd3tune.fsutil import atomic_write_bytes

    with safe_open(str(lora), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    meta.update(metadata)
    if LORA_ADAPTER_METADATA not in meta and "sd3tune.lora_rank" in meta:  # SimpleTuner's checkpoints have theirs
        meta[LORA_ADAPTER_METADATA] = adapter_metadata(int(meta["sd3tune.lora_rank"]),
                                                       float(meta["sd3tune.lora_alpha"]), tensors)
    atomic_write_bytes(lora, save(tensors, metadata=meta))


def adapter_metadata(rank: int, alpha: float, tensors: Any) -> str:
    """diffusers' ``lora_adapter_metadata`` for a LoRA of ``tensors`` (their names): the peft LoraConfig that
    ``load_lora_weights`` builds the adapter from (diffusers 0.42 ``_create_lora_config``: ``LoraConfig(**it)``, keys
    prefixed ``transformer.``), so diffusers scales it by alpha / rank with no sd3tune code. The target modules are
    the file's own layers, by full name (peft matches a name exactly), so no other layer gets an adapter."""
    modules = sorted({m.group(1) for name in tensors if (m := LORA_KEY.fullmatch(name))})
    return json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": modules,
                       "transformer.peft_type": "LORA", "transformer.bias": "none"}, indent=2, sort_keys=True)


def stamped(lora: Path, metadata: dict[str, str]) -> bool:
    """Stamp ``lora``; False for a file cut short after its header (its tensors cannot be read)."""
    from safetensors import SafetensorError

    try:
        stamp_lora(lora, metadata)
    except (SafetensorError, OSError):
        return False
    return True


def stamp_checkpoints(output: Path, stamp: dict[str, str], after_step: int) -> None:
    """Stamp this training's checkpoints (those past ``after_step``, where a resumed training began) with their step,
    so a checkpoint's file copied elsewhere samples as it trained (T5 length, shift, size) and a resumed training
    knows what trained before. A file the training did not finish writing is left as it is."""
    from sd3tune.simpletuner import keys
    from sd3tune.simpletuner.layout import checkpoint_step, checkpoints

    for folder in checkpoints(output):
        if (checkpoint_step(folder) or 0) <= after_step:
            continue
        file = folder / keys.LORA_WEIGHT_NAME
        if safetensors_metadata(file) is not None:
            stamped(file, at_step(stamp, checkpoint_step(folder)))


def changed_settings(earlier: dict[str, str], settings: dict[str, str]) -> list[str]:
    """'resolution 64 -> 128' for each stamped setting ``earlier`` (a LoRA's stamp) records otherwise."""
    return [f"{label} {earlier[key]} -> {settings[key]}" for key, label in SETTING_LABELS.items()
            if key in earlier and key in settings and earlier[key] != settings[key]]


def trained_otherwise(label: str, file: Path, lora_stamp: dict[str, str]) -> list[str]:
    """A note when a checkpoint trained with other settings than the evaluated LoRA (a resumed training changed
    them): every model samples with the LoRA's, so the checkpoint's column is not as it trained."""
    changes = changed_settings(safetensors_metadata(file) or {}, lora_stamp)
    if not changes:
        return []
    return [f"{label} trained with other settings than the LoRA ({', '.join(changes)}): it is sampled with the "
            "LoRA's, as every model here"]


def resumed_history(checkpoint: Path, stamp: dict[str, str]) -> str:
    """The ``sd3tune.history`` stamp of a training resumed from ``checkpoint`` (its folder, holding ``stamp``, its
    LoRA's metadata): the parts trained before, oldest first, each with the step it ended at and its settings (none
    for a checkpoint sd3tune did not stamp)."""
    from sd3tune.simpletuner.layout import checkpoint_step

    try:
        earlier = json.loads(stamp.get(HISTORY_KEY, "[]"))
    except json.JSONDecodeError:
        earlier = []
    part: dict[str, Any] = {"until_step": checkpoint_step(checkpoint), "checkpoint": checkpoint.name}
    part.update({k.removeprefix("sd3tune."): v for k, v in stamp.items() if k in SETTING_LABELS})
    if "sd3tune.trained_at" in stamp:
        part["trained_at"] = stamp["sd3tune.trained_at"]
    return json.dumps([*(earlier if isinstance(earlier, list) else []), part])
