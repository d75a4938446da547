"""`sd3tune export`: the LoRA as the tools outside sd3tune read it, at the strength it trained, with a model card.

Formats (``sd3tune.lora_formats``): ``diffusers`` (PEFT keys + the peft config diffusers takes alpha / rank from),
``kohya`` (sd-scripts' SD3 keys, q/k/v fused, ``.alpha``: ComfyUI, Forge, A1111) and ``comfyui`` (the kohya file:
ComfyUI reads its ``.alpha``, but no alpha from a PEFT file). Default: every format into ``RUN/export/``. Each file is
verified (merged deltas recomputed as its client does) before anything is written; a ``README.md`` model card goes
beside them; ``--push-to-hub ORG/NAME`` uploads the folder (private unless ``--public``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from sd3tune.defaults import SD3M
from sd3tune.errors import Sd3tuneError

if TYPE_CHECKING:
    from sd3tune.lora import LoraSource
    from sd3tune.model_card import CardFacts

FORMATS = ("diffusers", "kohya", "comfyui")
EXPORT_DIR = "export"
CARD = "README.md"
SAMPLES_DIR = "images"


@dataclass
class ExportOptions:
    lora: Path  # a run folder, output/checkpoint folder or .safetensors file
    formats: list[str] = field(default_factory=list)  # empty: all
    out: Path | None = None  # default: RUN/export (or export/ beside a file outside any run)
    base_model: str | None = None  # the Hub id for the card, when the run trained on a local folder
    push_to_hub: str | None = None
    private: bool = True
    force: bool = False


@dataclass
class ExportResult:
    out: Path
    files: list[Path]
    strength: float  # alpha / rank
    max_error: float  # the largest relative error of a merged delta, over every export
    url: str | None = None
    private: bool | None = None  # the pushed repository's visibility as the Hub reports it (None: not read)
    notes: list[str] = field(default_factory=list)


def run_export(opts: ExportOptions) -> ExportResult:
    from sd3tune.hub import check_push

    formats = _formats(opts.formats)
    if opts.push_to_hub is not None:  # first: out of reach fails in a second or two, before any work or import
        check_push(opts.push_to_hub)

    from safetensors.torch import save

    from sd3tune.fsutil import atomic_write_bytes, atomic_write_text, refuse_existing
    from sd3tune.hub import push_folder
    from sd3tune.locks import folder_lock
    from sd3tune.lora import resolve_lora
    from sd3tune.lora_formats import (DIFFUSERS_WEIGHT_NAME, diffusers_deltas, kohya_deltas, load_tensors,
                                      lora_pairs, original_deltas, to_diffusers, to_kohya, trained_scales, verify)
    from sd3tune.manifest import now, update_manifest
    from sd3tune.model_card import render_card
    from sd3tune.simpletuner.layout import find_run_root

    source = resolve_lora(opts.lora)
    tensors, metadata = load_tensors(source.file)
    pairs = lora_pairs(source.file, tensors)
    scales = trained_scales(source.file, metadata, list(pairs))
    base_model = _base_model(opts.base_model, source.base_model)
    run_root = find_run_root(source.file.parent)
    out = (opts.out or (run_root / EXPORT_DIR if run_root else source.file.parent / EXPORT_DIR)).expanduser()
    name = _name(source.file, run_root)

    original = original_deltas(pairs, scales)
    shared = _shareable(metadata, base_model)
    built: dict[Path, bytes] = {}
    worst = 0.0
    if "diffusers" in formats:
        data = save(*to_diffusers(pairs, shared, scales))
        exported, meta = _read_back(data)
        worst = max(worst, verify("diffusers", original, diffusers_deltas(source.file, exported, meta)))
        built[out / DIFFUSERS_WEIGHT_NAME] = data
    if "kohya" in formats or "comfyui" in formats:
        data = save(*to_kohya(pairs, shared, scales))
        worst = max(worst, verify("kohya", original, kohya_deltas(_read_back(data)[0])))
        built[out / f"{name}.safetensors"] = data

    facts, samples = _facts(source, metadata, run_root, base_model, name, built, opts.push_to_hub, scales)
    copies = {out / SAMPLES_DIR / f"{i:02d}{src.suffix}": src for i, (src, _) in enumerate(samples)}
    files = [*built, out / CARD, *copies]
    notes: list[str] = []
    with folder_lock(out, "export", on_note=notes.append, create=True):
        refuse_existing(files, opts.force)
        for path, data in built.items():
            atomic_write_bytes(path, data)
        for dst, src in copies.items():
            atomic_write_bytes(dst, src.read_bytes())
        atomic_write_text(out / CARD, render_card(facts))
    written = [str(p.relative_to(out)) for p in files]
    if run_root is not None:
        entry = {"created": now(), "out": str(out.resolve()), "formats": formats, "lora": str(source.file),
                 "lora_sha256": source.sha256, "files": written,
                 "base_model": base_model, "push_to_hub": opts.push_to_hub}
        try:
            update_manifest(run_root, "exports", entry, append=True)
        except (OSError, Sd3tuneError):  # a read-only run folder: the export itself is complete
            notes.append(f"the export is not recorded in {run_root / 'sd3tune.json'} (cannot write it)")
    url, private = push_folder(out, written, opts.push_to_hub, opts.private) if opts.push_to_hub else (None, None)
    if url and private is not None and private != opts.private:
        notes.append(f"{opts.push_to_hub} already existed and is {visibility(private)}: "
                     f"--{visibility(opts.private)} did not change it (change it in the repository's settings)")
    return ExportResult(out=out, files=files, strength=facts.strength, max_error=worst, url=url, private=private,
                        notes=notes)


def visibility(private: bool | None) -> str:
    return "visibility not confirmed" if private is None else "private" if private else "public"


def _formats(asked: list[str]) -> list[str]:
    wrong = [f for f in asked if f not in FORMATS]
    if wrong:
        raise Sd3tuneError(f"--format {wrong[0]!r} is not one of {', '.join(FORMATS)}",
                           hint="repeat --format for several; leave it out for all")
    return [f for f in FORMATS if f in asked] if asked else list(FORMATS)


def _base_model(given: str | None, trained: str | None) -> str:
    """The base model's Hub id for the card: --base-model, else the one the LoRA trained on when that is a Hub id."""
    from sd3tune.fsutil import model_folder
    from sd3tune.hub import is_repo_id

    if given is not None:
        if not is_repo_id(given):
            raise Sd3tuneError(f"--base-model {given!r} is not a Hub model id", hint=f"pass e.g. --base-model {SD3M}")
        return given
    if trained is None or model_folder(trained) is not None:
        where = f"a local folder ({trained})" if trained else "an unknown base model"
        raise Sd3tuneError(f"the LoRA trained on {where}: its model card needs the Hub id of that model",
                           hint=f"pass --base-model HUB_ID, e.g. --base-model {SD3M}")
    return trained


def _shareable(metadata: dict[str, str], base_model: str) -> dict[str, str]:
    """The stamp as it leaves this machine: no local path (the run folder is left out; a base model given as a local
    folder is named by its Hub id)."""
    out = {k: v for k, v in metadata.items() if k != "sd3tune.run_dir"}
    if "sd3tune.base_model" in out:
        out["sd3tune.base_model"] = base_model
    return out


def _name(file: Path, run_root: Path | None) -> str:
    """The kohya file's name (what ComfyUI and Forge list): the run folder's, plus the checkpoint's when it is one."""
    from sd3tune.simpletuner.layout import checkpoint_step

    stem = run_root.name if run_root is not None else file.stem
    if (step := checkpoint_step(file.parent)) is not None:
        stem += f"-checkpoint-{step}"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")
    return stem if stem and stem != "pytorch_lora_weights" else "lora"


def _read_back(data: bytes):
    """The tensors and metadata of a serialised safetensors file, as a client reading the file gets them."""
    import json
    import struct

    from safetensors.torch import load

    (size,) = struct.unpack("<Q", data[:8])
    return load(data), json.loads(data[8:8 + size]).get("__metadata__") or {}


def _facts(source: LoraSource, metadata: dict[str, str], run_root: Path | None, base_model: str, name: str,
           built: dict[Path, bytes], repo_id: str | None, scales: dict[str, float]) -> tuple[CardFacts, list]:
    """What the model card says, and the sample images to copy beside it (source path, prompt)."""
    from sd3tune import __version__
    from sd3tune.lora_formats import DIFFUSERS_WEIGHT_NAME
    from sd3tune.manifest import read_manifest
    from sd3tune.model_card import CardFacts, Sample, evaluation_facts, validation_samples

    strength = next(iter(scales.values()))
    evaluation, samples, trigger, images = {}, [], None, None
    if run_root is not None:
        trigger = (read_manifest(run_root).get("init") or {}).get("trigger")
        evaluation, samples = evaluation_facts(run_root, source.sha256)
        images = _training_images(run_root)
        if not samples and source.config is not None:
            from sd3tune.simpletuner.layout import checkpoint_step

            step = checkpoint_step(source.file.parent)
            output = source.file.parent.parent if step is not None else source.file.parent
            stamped = metadata.get("sd3tune.steps", "")
            if step is None and stamped.isdigit():  # the final LoRA's: a later, unfinished training's are not its
                step = int(stamped)
            samples = validation_samples(output, source.config.validation.prompt, up_to_step=step)
    rank = metadata.get("sd3tune.lora_rank")
    alpha = metadata.get("sd3tune.lora_alpha")
    resolution = metadata.get("sd3tune.resolution")
    if resolution and metadata.get("sd3tune.resolution_type", "pixel") == "pixel":
        resolution += " px"
    names = {p.name for p in built}
    facts = CardFacts(
        title=name, base_model=base_model, trigger=trigger, strength=strength,
        rank=int(rank) if rank else None, alpha=float(alpha) if alpha else None, steps=metadata.get("sd3tune.steps"),
        resolution=resolution, images=images,
        t5_max_length=int(metadata["sd3tune.t5_max_length"]) if "sd3tune.t5_max_length" in metadata else None,
        schedule_shift=source.schedule_shift,
        diffusers_file=DIFFUSERS_WEIGHT_NAME if DIFFUSERS_WEIGHT_NAME in names else None,
        kohya_file=f"{name}.safetensors" if f"{name}.safetensors" in names else None, repo_id=repo_id,
        samples=[Sample(f"{SAMPLES_DIR}/{i:02d}{p.suffix}", prompt) for i, (p, prompt) in enumerate(samples)],
        evaluation=evaluation, sd3tune_version=__version__)
    return facts, samples


def _training_images(run_root: Path) -> int | None:
    from sd3tune.evaluation import training_set
    from sd3tune.simpletuner.reader import read_run

    try:
        run = read_run(run_root)
        return training_set(run.backends, run.paths).total
    except (Sd3tuneError, OSError):
        return None


# --- `sd3tune export` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402

app = command_app()


@app.command("export")
def export_command(
    lora: Annotated[Path, typer.Argument(metavar="RUN|LORA", help="Run folder, checkpoint folder or .safetensors file.")],
    format_: Annotated[Optional[list[str]], typer.Option("--format", help="diffusers, kohya or comfyui (repeatable; default: all).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: RUN/export).")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Hub id of the base model, for the model card (needed when the run trained on a local folder).")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", metavar="ORG/NAME", help="Upload the export folder to this Hub model repository (token: HF_TOKEN or `hf auth login`).")] = None,
    private: Annotated[bool, typer.Option("--private/--public", help="Visibility of a repository --push-to-hub creates.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace files an earlier export wrote.")] = False,
) -> None:
    """Export the LoRA for diffusers, kohya/A1111/Forge and ComfyUI at its trained strength, with a model card.

    \b
    examples:
      sd3tune export runs/art --base-model stabilityai/stable-diffusion-3-medium-diffusers
      sd3tune export runs/art --format kohya --out ~/ComfyUI/models/loras/art
      sd3tune export runs/art --push-to-hub my-name/art-sd3-lora      # private; --public to share
    """
    t = time.perf_counter()
    result = run_export(ExportOptions(lora=lora, formats=list(format_ or []), out=out, base_model=base_model,
                                      push_to_hub=push_to_hub, private=private, force=force))
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    for path in result.files:
        typer.echo(str(path))
    typer.echo(f"strength alpha/rank {result.strength:g}; merged deltas verified (max relative error "
               f"{result.max_error:.1e}) in {time.perf_counter() - t:.1f} s", err=True)
    if result.url:
        typer.echo(f"pushed: {result.url} ({visibility(result.private)})", err=True)
