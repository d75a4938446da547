"""The sampler settings an image is made with (steps, guidance, size, T5 length, schedule shift), resolved from the
user's flags and the LoRA's training, so a LoRA samples as it trained. Used by generate and evaluate."""

from __future__ import annotations

from dataclasses import dataclass

from sd3tune.defaults import SD3M
from sd3tune.errors import Sd3tuneError
from sd3tune.fsutil import absolute_model
from sd3tune.lora import LoraSource
from sd3tune.simpletuner import keys

DIFFUSERS_T5_DEFAULT = 256  # StableDiffusion3Pipeline's max_sequence_length default
T5_MAX_TOKENS = 512  # the most StableDiffusion3Pipeline takes (check_inputs refuses more)
SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2
MAX_SAMPLING_STEPS = 10_000  # far beyond any use (28 is SD3's default): a typo, not a wish to wait for days


@dataclass
class SamplerSettings:
    steps: int = 28
    guidance: float = 7.0
    width: int = 1024
    height: int = 1024
    negative: str | None = None
    max_sequence_length: int = DIFFUSERS_T5_DEFAULT
    shift: float | None = None


@dataclass
class SamplerFlags:
    """The sampler flags of `generate` (None: from the LoRA's training, else the default); evaluate sets a few."""

    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative: str | None = None
    max_sequence_length: int | None = None
    shift: float | None = None
    drop_t5: bool = False


def resolve_settings(opts: SamplerFlags, lora: LoraSource | None) -> tuple[str, SamplerSettings, list[str]]:
    """Merge flags (``opts``: a ``SamplerFlags``, or generate's options, which hold the same fields) with the
    training settings of ``lora``; say when a flag overrides the run. Returns the base model, the settings and notes."""
    notes: list[str] = []
    later = lora.later_checkpoint if lora else None
    if later is not None:  # the run's LoRA is not its latest weights: a user who resumed may think it is
        notes.append(f"the run's LoRA has {lora.metadata['sd3tune.steps']} steps; {later.parent.name}, from a later "
                     f"training that did not finish, has more (--lora {later.parent} samples it)")
    cfg = lora.config if lora else None
    model = absolute_model(opts.model or (lora.base_model if lora else None) or SD3M)
    if opts.model and lora and lora.base_model and model != absolute_model(lora.base_model):
        notes.append(f"--model {opts.model} overrides the run's base model {lora.base_model}")
    s = SamplerSettings()
    run_len = None
    if lora is not None and "sd3tune.t5_max_length" in lora.metadata:
        run_len = int(lora.metadata["sd3tune.t5_max_length"])
    elif cfg is not None:
        run_len = keys.SD3_T5_MAX_LENGTH  # SimpleTuner caps SD3's T5 at 154 tokens in training
    length = opts.max_sequence_length
    if length is not None and not 1 <= length <= T5_MAX_TOKENS:  # diffusers refuses more; 0 fails inside the pipe
        raise Sd3tuneError(f"--max-sequence-length {length} must be between 1 and {T5_MAX_TOKENS}",
                           hint=f"T5 tokens read from the prompt: {keys.SD3_T5_MAX_LENGTH} as SimpleTuner trains SD3 "
                                f"LoRAs, {DIFFUSERS_T5_DEFAULT} diffusers' default, {T5_MAX_TOKENS} the most SD3 takes")
    if opts.drop_t5:  # no T5 tokens: the pipeline pads its T5 part with zeros to its own default length
        if opts.max_sequence_length is not None:
            notes.append("--max-sequence-length ignored with --drop-t5 (there are no T5 tokens)")
    elif opts.max_sequence_length is not None:
        s.max_sequence_length = opts.max_sequence_length
        if run_len and opts.max_sequence_length != run_len:
            notes.append(f"--max-sequence-length {opts.max_sequence_length} overrides the T5 length {run_len} the "
                         "LoRA was trained with")
    elif run_len:
        s.max_sequence_length = run_len
        notes.append(f"T5 length {run_len} (as SimpleTuner trained the LoRA)")
    else:
        s.max_sequence_length = DIFFUSERS_T5_DEFAULT
    run_shift = lora.schedule_shift if lora else None
    if opts.shift is not None:
        if not 0 < opts.shift < float("inf"):  # nan fails every comparison
            raise Sd3tuneError(f"--shift {opts.shift} must be a finite number above 0",
                               hint="SD3 Medium trains and samples with shift 3.0")
        s.shift = opts.shift
        if run_shift is not None and run_shift != opts.shift:
            notes.append(f"--shift {opts.shift} overrides the run's schedule shift {run_shift}")
    else:
        s.shift = run_shift
    if lora and abs(lora.alpha_over_rank - 1.0) > 1e-9:
        notes.append(f"LoRA scale multiplied by alpha/rank = {lora.alpha_over_rank:g} from training")
    side = (lora.square_side if lora else None) or 1024
    if (opts.width is None or opts.height is None) and side % SIZE_MULTIPLE:
        notes.append(f"the run's resolution {side} is not a multiple of {SIZE_MULTIPLE}: sampling at "
                     f"{side - side % SIZE_MULTIPLE} (--width/--height choose)")
        side -= side % SIZE_MULTIPLE
    s.width = opts.width if opts.width is not None else side
    s.height = opts.height if opts.height is not None else s.width  # a width alone makes a square
    for name, v in (("width", s.width), ("height", s.height)):
        if v < 64 or v % SIZE_MULTIPLE:
            raise Sd3tuneError(f"--{name} {v} must be a multiple of {SIZE_MULTIPLE} and at least 64",
                               hint="e.g. 1024, 1152 or 768")
    if opts.steps is not None:
        if not 1 <= opts.steps <= MAX_SAMPLING_STEPS:
            raise Sd3tuneError(f"--steps {opts.steps} must be at least 1" if opts.steps < 1 else
                               f"--steps {opts.steps} is over {MAX_SAMPLING_STEPS:,}", hint="SD3 Medium's default is 28")
        s.steps = opts.steps
    if opts.guidance is not None:
        if not 0 <= opts.guidance < float("inf"):  # nan fails every comparison
            raise Sd3tuneError(f"--guidance {opts.guidance} must be a finite number, not negative",
                               hint="SD3 Medium's default is 7.0; 1 or less samples unguided")
        s.guidance = opts.guidance
    s.negative = opts.negative
    if opts.negative and s.guidance <= 1:
        notes.append(f"--negative has no effect at guidance {s.guidance:g} (classifier-free guidance needs > 1)")
    return model, s, notes
