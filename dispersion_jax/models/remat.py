"""Activation checkpointing policies of a block (model.remat), each with the set of values it keeps for backward.

The block's input (the scan carry / residual stream) is always kept; everything not saved is recomputed.

| policy  | saved inside a block                                                                  | MaxText's name |
|---------|---------------------------------------------------------------------------------------|----------------|
| none    | everything (no recomputation)                                                          | (remat off)    |
| full    | nothing                                                                                | full           |
| minimal | the outputs of the named projections below (q, k, v, o and the MLP's), nothing else:  | minimal        |
|         | not the attention scores / context, not norms, RoPE or the MLP's activation           |                |
| dots    | every matmul output without batch dimensions (jax's checkpoint_dots_with_no_batch_dims): | (older minimal)|
|         | the same projections, chosen by primitive instead of by name                           |                |

`minimal` is MaxText 0.2.5's `minimal` (save_only_these_names of query/key/value/out projections and the MLP's
wi_0 / wi_1 / wo) in our layer names: the dense layers tag their outputs with their own names (lora_dense.py).
"""

import jax

PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Qwen3
    "c_attn", "c_proj", "c_fc",  # GPT-2 (c_proj: the attention's and the MLP's output projections)
)  # fmt: skip

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
