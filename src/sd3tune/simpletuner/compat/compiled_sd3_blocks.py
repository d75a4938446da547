"""Fix 4: regional compilation (``compile.regional``, accelerate's ``compile_regions``) wraps each SD3 transformer
block in a compiled module, but SimpleTuner's SD3 forward never calls a block: ``_sd3_apply_joint_transformer_block``
calls the block's norms, attention and feed-forward one by one, so every block ran eagerly and only the small
top-level layers were compiled (24 blocks: 7 Inductor graphs, no faster than eager, ~25 s of compile for nothing). A
compiled block is now called as a block when its inputs are the ones diffusers' ``JointTransformerBlock.forward``
takes (one timestep embedding per sample, no attention offload): the same computation, through the compiled code.
Eager blocks keep SimpleTuner's path untouched."""

from __future__ import annotations

from sd3tune.simpletuner.compat._patching import ANY, expect, is_compiled, replace

APPLY_BLOCK = ("block", "hidden_states", "encoder_hidden_states", "temb_hidden", "temb_context",
               "joint_attention_kwargs", "offload_attention")


def applies_to(module) -> str | None:
    # the replacement takes exactly SimpleTuner's arguments, and calls a block the way diffusers' forward is declared
    return (expect(module, "_sd3_apply_joint_transformer_block", APPLY_BLOCK)
            or expect(module, "JointTransformerBlock.forward",
                      ("self", "hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs", ANY)))


def apply(module) -> None:
    def through_compiled_blocks(original):
        def apply_block(block, hidden_states, encoder_hidden_states, temb_hidden, temb_context,
                        joint_attention_kwargs=None, offload_attention=False):
            if (not offload_attention and temb_context is temb_hidden and temb_hidden.ndim == 2
                    and is_compiled(block)):
                return block(hidden_states, encoder_hidden_states, temb_hidden, joint_attention_kwargs)
            return original(block, hidden_states, encoder_hidden_states, temb_hidden, temb_context,
                            joint_attention_kwargs=joint_attention_kwargs, offload_attention=offload_attention)
        return apply_block

    replace(module, "_sd3_apply_joint_transformer_block", through_compiled_blocks)
