"""A tiny, randomly initialised SD3 pipeline and a small captioned image set, built fully offline.

Nothing here touches the network: the CLIP tokenizers are rebuilt from the real OpenAI BPE vocabulary that the
``open_clip_torch`` wheel ships (``bpe_simple_vocab_16e6.txt.gz``), and the T5 tokenizer is a small unigram
vocabulary trained locally with ``sentencepiece``. The result is a normal diffusers folder that SimpleTuner,
diffusers and ``sd3tune`` load exactly like the real Stable Diffusion 3 Medium, only ~15 MB and fast on a CPU.
"""

from __future__ import annotations

import gzip
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Sizes of the tiny model: an SD3 small enough for SimpleTuner, accelerate and diffusers to run end to end on a CPU.
JOINT_DIM = 32
POOLED_DIM = 64  # two CLIP projections of 32
CLIP_HIDDEN = 16
CLIP_PROJECTION = 32
T5_VOCAB_SIZE = 200
T5_EXTRA_IDS = 100

_T5_CORPUS = """a photo of a cat sitting on a red chair
a painting of a dog running in a green field
a small blue square on a white background
a large yellow circle next to a black triangle
an astronaut riding a horse on the moon
a bowl of fruit with apples and oranges
a city street at night with bright lights
a mountain landscape with snow and trees
a portrait of a woman with long hair
a close up of a flower with purple petals
the quick brown fox jumps over the lazy dog
concept art painting of a castle, a dragon, a forest, a spaceship
shapes stripes gradient noise texture pattern colour color
"""


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_file() -> Path:
    """The OpenAI CLIP BPE merges file shipped inside the open_clip_torch wheel."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the open_clip_torch installation")
    return path


def _write_clip_tokenizer(path: Path, pad_token: str):
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    # transformers 5 takes the vocabulary files as ``vocab=`` / ``merges=``.
    return CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def _write_t5_tokenizer(path: Path):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as td:
        corpus = Path(td) / "corpus.txt"
        corpus.write_text(_T5_CORPUS * 20)
        prefix = str(Path(td) / "spm")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=prefix, vocab_size=T5_VOCAB_SIZE, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    return T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=256)


@dataclass(frozen=True)
class RandomSd3Sizes:
    """The shapes of a random SD3 pipeline: keyword arguments of each component's config (text encoders keep 2
    layers; what they share is filled in by ``build_random_sd3``)."""

    clip_l: dict[str, Any]  # CLIPTextConfig: hidden_size, intermediate_size, num_attention_heads, projection_dim, ...
    clip_g: dict[str, Any]
    t5: dict[str, Any]  # T5Config: d_model, d_kv, d_ff, num_heads
    transformer: dict[str, Any]  # SD3Transformer2DModel
    vae: dict[str, Any]  # AutoencoderKL


_TINY_CLIP = dict(hidden_size=CLIP_HIDDEN, intermediate_size=37, num_attention_heads=4, projection_dim=CLIP_PROJECTION,
                  hidden_act="gelu")
TINY_SIZES = RandomSd3Sizes(
    clip_l=_TINY_CLIP, clip_g=_TINY_CLIP, t5=dict(d_model=JOINT_DIM, d_kv=8, d_ff=37, num_heads=4),
    transformer=dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                     num_attention_heads=4, joint_attention_dim=JOINT_DIM, caption_projection_dim=32,
                     pooled_projection_dim=POOLED_DIM, out_channels=16, pos_embed_max_size=64),
    vae=dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
             up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
             latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False),
)


# The tiny SD3 in the shape ComfyUI and kohya sd-scripts accept for an MMDiT (head dim 64, layers = heads = hidden / 64:
# they derive every size from the depth): 2 layers of 2 heads, hidden 128. For `sd3tune export`'s tests.
KOHYA_SHAPED_SIZES = RandomSd3Sizes(
    clip_l=TINY_SIZES.clip_l, clip_g=TINY_SIZES.clip_g, t5=TINY_SIZES.t5, vae=TINY_SIZES.vae,
    transformer={**TINY_SIZES.transformer, "attention_head_dim": 64, "num_attention_heads": 2,
                 "caption_projection_dim": 128})


def build_tiny_sd3(out_dir: str | Path, seed: int = 0, sizes: RandomSd3Sizes = TINY_SIZES) -> Path:
    """Write a tiny random StableDiffusion3Pipeline to ``out_dir`` (a diffusers folder) and return its path."""
    return build_random_sd3(out_dir, sizes, seed)


def build_random_sd3(out_dir: str | Path, sizes: RandomSd3Sizes, seed: int = 0, device: str = "cpu",
                     dtype: Any = None) -> Path:
    """Write a random StableDiffusion3Pipeline of ``sizes`` to ``out_dir``: built on ``device``, the transformer and
    text encoders cast to ``dtype`` when given (the VAE stays float32, as in the real SD3 Medium)."""
    from sd3tune.runtime import quiet_libraries

    quiet_libraries()  # first: before diffusers' and transformers' imports
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as td:
        tok1 = _write_clip_tokenizer(Path(td) / "tokenizer", pad_token="<|endoftext|>")
        tok2 = _write_clip_tokenizer(Path(td) / "tokenizer_2", pad_token="!")
        tok3 = _write_t5_tokenizer(Path(td) / "tokenizer_3")

        def clip(shape: dict[str, Any]) -> CLIPTextModelWithProjection:
            cfg = CLIPTextConfig(vocab_size=len(tok1), num_hidden_layers=2, max_position_embeddings=77,
                                 layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **shape)
            return CLIPTextModelWithProjection(cfg).eval()

        with torch.device(device):  # the order of creation fixes every weight for a seed: keep it
            te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), num_layers=2, feed_forward_proj="gated-gelu",
                                          dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                          **sizes.t5)).eval()
            transformer = SD3Transformer2DModel(**sizes.transformer)
            vae = AutoencoderKL(**sizes.vae)
            te1, te2 = clip(sizes.clip_l), clip(sizes.clip_g)
        if dtype is not None:
            transformer, te1, te2, te3 = (m.to(dtype) for m in (transformer, te1, te2, te3))
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=vae, text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
            text_encoder_3=te3, tokenizer_3=tok3,
        )
        return save_pipeline(pipe, out)


def save_pipeline(pipe, out: Path) -> Path:
    """Save an SD3 pipeline as a diffusers folder that SimpleTuner loads like the real SD3 Medium."""
    pipe.save_pretrained(out, safe_serialization=True)
    # SimpleTuner and the real SD3M folder name the fast T5 tokenizer class (an alias in transformers 5).
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return out


_SUBJECTS = ["castle", "dragon", "forest", "spaceship", "robot", "lighthouse", "desert city", "sea monster"]


def make_concept_images(out_dir: str | Path, count: int = 8, size: int = 64, trigger: str = "sd3tune-style",
                        seed: int = 0) -> Path:
    """Write ``count`` synthetic "concept art" PNGs with matching ``.txt`` captions (a strong, learnable style)."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        arr = np.stack([np.outer(np.ones(size), ramp), np.outer(ramp[::-1], np.ones(size)),
                        np.full((size, size), 40 + 20 * (i % 4), dtype=np.float32)], -1)
        im = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rng.randint(0, size // 2), rng.randint(0, size // 2)
            w = rng.randint(size // 8, size // 2)
            draw.ellipse([x, y, x + w, y + w], fill=(255, 230 - 10 * i, 40))
        im.save(out / f"concept_{i:02d}.png")
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        (out / f"concept_{i:02d}.txt").write_text(f"{trigger}, concept art of a {subject}, warm light\n")
    return out


def build_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random transformers CLIP (text + vision) with the real CLIP tokenizer, saved to ``out_dir``, offline.

    For tests and the offline quickstart only: its numbers move when images move, but mean nothing perceptually.
    """
    from sd3tune.runtime import quiet_libraries

    quiet_libraries()  # first: before transformers' import
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as td, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = _write_clip_tokenizer(Path(td) / "tokenizer", pad_token="<|endoftext|>")
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                             eos_token_id=49407, pad_token_id=49407),
            vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4),
            projection_dim=32)
        model = CLIPModel(config).eval()
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                     crop_size={"height": image_size,
                                                                                "width": image_size}),
                                  tokenizer=tok)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out
