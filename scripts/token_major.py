"""bench_generate's compile-tokenmajor candidate (not yet in `sd3tune generate --compile`): SD3 joint transformer
blocks whose activations live token-major in memory, (tokens, batch, channels), instead of diffusers' (batch, tokens,
channels), so the joint attention moves no data it does not have to.

In diffusers' JointAttnProcessor2_0 with a batch above one (CFG makes it 8 for 4 images), each block and step copies
the whole joint sequence four times: q, k and v of the image and text streams are concatenated into (batch, heads,
tokens, head_dim) tensors, and the attention output is transposed back and split into its image and text parts for
the output projections. At SD3-Medium size, 1024 px and a CFG batch of 8 that is ~0.87 GB of memory traffic per
block and step, ~50 ms per image on an H100, ~4% of a compiled image.

Token-major, each stream's rows are one contiguous range of a 2-D matrix (row = token * batch + sample), so:
- one matmul per stream computes its q, k and v (its three projections fused) straight into its rows of a shared
  q/k/v buffer: no concatenation;
- the attention reads q, k and v as strided views of that buffer and (cuDNN and flash attention keep the query's
  layout) writes its output token-major, so each output projection reads its stream's rows in place.
The projections and the attention run in one custom op (``joint_attention``), so torch.compile cannot reintroduce
the copies; the norms, modulation, gates and feed-forwards stay in the compiled block. The layout changes once per
step: in the first block (which the transformer hands a contiguous tensor, so it compiles into one more graph than
diffusers' blocks) and after the last (its output is a transposed view that the final norm reads as usual).

Applied only to blocks whose computation this reproduces exactly (SD3 Medium's: no q/k normalisation, no second
attention, no chunked feed-forward, adaLN-Zero norms); others keep diffusers' forward. For inference (no dropout)
after the LoRA is fused: `generate --compile` fuses it first.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # SD3.5's q/k normalisation: not SD3 Medium's block


@torch.library.custom_op("sd3tune_bench::joint_attention", mutates_args=())
def joint_attention(x: torch.Tensor, c: torch.Tensor, w_x: torch.Tensor, b_x: torch.Tensor, w_c: torch.Tensor,
                    b_c: torch.Tensor, heads: int, batch: int) -> torch.Tensor:
    """SD3 joint attention on token-major rows. ``x`` (image tokens * batch, C) and ``c`` (text tokens * batch, C):
    the normalised streams; ``w_*``/``b_*``: each stream's fused q/k/v projection ((3C, C) and (3C,)). Returns the
    attention output, (all tokens * batch, C), image rows first, before the output projections."""
    rows, width = x.shape[0], w_x.shape[0] // 3
    qkv = x.new_empty(rows + c.shape[0], 3 * width)
    torch.addmm(b_x, x, w_x.t(), out=qkv[:rows])  # each stream writes its own rows: no concatenation
    torch.addmm(b_c, c, w_c.t(), out=qkv[rows:])
    tokens = qkv.shape[0] // batch
    q, k, v = qkv.view(tokens, batch, 3, heads, width // heads).permute(2, 1, 3, 0, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, tokens, head_dim), laid out like q
    return out.permute(2, 0, 1, 3).reshape(tokens * batch, width)  # a view when the kernel kept q's layout


@joint_attention.register_fake
def _joint_attention_shape(x, c, w_x, b_x, w_c, b_c, heads, batch):
    return x.new_empty(x.shape[0] + c.shape[0], w_x.shape[0] // 3)


def eligible(block: Any) -> bool:
    """Whether ``block`` computes exactly what ``_forward`` does (an SD3-Medium-style joint block, in eval mode)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

    if type(block) is not JointTransformerBlock or block.training:
        return False
    attn = block.attn
    context_norm = AdaLayerNormContinuous if block.context_pre_only else AdaLayerNormZero
    projections = (attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    return (not block.use_dual_attention and block._chunk_size is None
            and type(block.norm1) is AdaLayerNormZero and block.norm1.emb is None
            and type(block.norm1_context) is context_norm and getattr(block.norm1_context, "emb", None) is None
            and type(attn.processor) is JointAttnProcessor2_0
            and all(getattr(attn, name, None) is None for name in QK_NORMS)
            and all(p is not None and p.bias is not None for p in projections))


def apply(transformer: Any) -> int:
    """Give every eligible block of ``transformer`` the token-major forward, with each stream's q/k/v projections fused
    into one weight and bias (buffers ``qkv_weight``/``qkv_bias`` and ``added_qkv_weight``/``added_qkv_bias`` of the
    attention; the separate q/k/v weights become views of them, so no memory is added). Not diffusers'
    ``Attention.fuse_projections``: importing SimpleTuner replaces it with one that deletes the separate projections.
    Returns how many blocks changed."""
    changed = 0
    for block in getattr(transformer, "transformer_blocks", []):
        if not eligible(block):
            continue
        attn = block.attn
        _fuse(attn, "qkv", (attn.to_q, attn.to_k, attn.to_v))
        _fuse(attn, "added_qkv", (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        block.forward = types.MethodType(_forward, block)
        changed += 1
    return changed


def _fuse(attn: Any, name: str, parts: tuple) -> None:
    """Stack ``parts``' weights and biases into ``attn``'s buffers ``{name}_weight``/``{name}_bias``; the parts keep
    working, as views of them."""
    weight = torch.cat([part.weight.data for part in parts])
    bias = torch.cat([part.bias.data for part in parts])
    attn.register_buffer(f"{name}_weight", weight, persistent=False)
    attn.register_buffer(f"{name}_bias", bias, persistent=False)
    rows = 0
    for part in parts:
        part.weight.data, part.bias.data = weight[rows:rows + part.out_features], bias[rows:rows + part.out_features]
        rows += part.out_features


def _forward(self: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
             joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """JointTransformerBlock.forward (diffusers 0.42) for eligible blocks, token-major inside. Takes and returns
    (batch, tokens, C) tensors; what it returns are transposed views of token-major memory, so from the second block
    on the transposes below cost nothing."""
    batch, n, t = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
    x = hidden_states.transpose(0, 1).contiguous()  # (n, batch, C); (batch, C) modulation broadcasts over tokens
    c = encoder_hidden_states.transpose(0, 1).contiguous()
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(
        self.norm1.silu(temb)).chunk(6, dim=1)
    norm_x = self.norm1.norm(x) * (1 + scale_msa) + shift_msa
    context_norm = self.norm1_context
    if self.context_pre_only:
        scale, shift = context_norm.linear(context_norm.silu(temb).to(c.dtype)).chunk(2, dim=1)
        norm_c = context_norm.norm(c) * (1 + scale) + shift
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_norm.linear(
            context_norm.silu(temb)).chunk(6, dim=1)
        norm_c = context_norm.norm(c) * (1 + c_scale_msa) + c_shift_msa

    attn = self.attn
    out = torch.ops.sd3tune_bench.joint_attention(
        norm_x.view(n * batch, -1), norm_c.view(t * batch, -1), attn.qkv_weight, attn.qkv_bias,
        attn.added_qkv_weight, attn.added_qkv_bias, attn.heads, batch)
    x = x + gate_msa * attn.to_out[0](out[:n * batch]).view(n, batch, -1)
    norm_x = self.norm2(x) * (1 + scale_mlp) + shift_mlp
    x = x + gate_mlp * self.ff(norm_x)

    if self.context_pre_only:
        return None, x.transpose(0, 1)
    c = c + c_gate_msa * attn.to_add_out(out[n * batch:]).view(t, batch, -1)
    norm_c = self.norm2_context(c) * (1 + c_scale_mlp) + c_shift_mlp
    c = c + c_gate_mlp * self.ff_context(norm_c)
    return c.transpose(0, 1), x.transpose(0, 1)
