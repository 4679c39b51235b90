"""Autoregressive decoding of both model families, with or without a KV cache, greedy or sampled.

One jitted call generates a whole batch: the prompts are right-padded into a [B, P] block (row b's token at
position p sits in cache slot p, see models/kv_cache.py), one prefill pass fills the cache, then a
`lax.while_loop` feeds one token per row per step until every row has produced `eos_id` or `max_new_tokens`
tokens. Without the cache each step re-runs the model over the whole [B, P + max_new_tokens] buffer (the
reference the cache is timed and tested against). Sampling applies temperature, then top-k, then top-p, in the
order of transformers' logits warpers, with a `jax.random` key per step folded from `seed`.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dispersion_jax.interop import hf
from dispersion_jax.models import build_model


@dataclasses.dataclass(frozen=True)
class Sampling:
  """do_sample=False is greedy (argmax; the other fields are then ignored)."""

  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0  # 0 = no top-k filter
  top_p: float = 1.0  # 1.0 = no nucleus filter

  def __post_init__(self):
    if self.do_sample and not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature} must be > 0 when sampling (use greedy for 0)")
    if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1]")


def unrolled(cfg, params):
  """(cfg, params) with one parameter subtree per block (`h_{i}`), no remat: the layout the KV cache runs on."""
  flat = hf.per_layer(cfg, traverse_util.flatten_dict(params))
  return dataclasses.replace(cfg, scan_layers=False, remat="none"), traverse_util.unflatten_dict(flat)


def filter_logits(logits_BxV, temperature, top_k, top_p):
  """Temperature, top-k (0 = off), top-p (1 = off; transformers' TopP: drop the tokens whose cumulative
  probability, summed from the least likely up, stays <= 1 - top_p; the most likely token always stays); removed
  tokens get -inf. The settings may be traced values: one compiled decoder serves every sampling setting."""
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  V = logits_BxV.shape[-1]
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)  # ascending
  kth_Bx1 = jnp.take(sorted_BxV, jnp.clip(V - top_k, 0, V - 1), axis=-1)[:, None]
  logits_BxV = jnp.where((top_k > 0) & (logits_BxV < kth_Bx1), -jnp.inf, logits_BxV)
  order_BxV = jnp.argsort(logits_BxV, axis=-1)
  sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
  drop_sorted_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1) <= 1.0 - top_p
  drop_sorted_BxV = drop_sorted_BxV.at[:, -1].set(False)
  rows_Bx1 = jnp.arange(order_BxV.shape[0])[:, None]
  drop_BxV = jnp.zeros_like(drop_sorted_BxV).at[rows_Bx1, order_BxV].set(drop_sorted_BxV)
  return jnp.where(drop_BxV, -jnp.inf, logits_BxV)


def _pick(logits_BxV, key, knobs):
  """Next tokens: argmax, or (knobs[0] set) a draw from the filtered distribution; only the taken branch runs."""
  do_sample, temperature, top_k, top_p = knobs
  return jax.lax.cond(
      do_sample,
      lambda: jax.random.categorical(key, filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1),
      lambda: jnp.argmax(logits_BxV, axis=-1),
  ).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "total", "use_cache"))
def _generate(cfg, params, prompt_BxP, lengths_B, done_B, key, eos_id, max_new, knobs, *, total, use_cache):
  """tokens [B, total] (prompt, then what was generated); rows done_B from the start are padding."""
  model = build_model(cfg)
  B, P = prompt_BxP.shape
  rows_B = jnp.arange(B)
  tokens_BxS = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt_BxP)
  positions_BxS = jnp.broadcast_to(jnp.arange(total), (B, total))

  if use_cache:
    shapes = jax.eval_shape(lambda: model.apply({"params": params}, tokens_BxS, positions_BxS, mutable=["cache"]))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1]["cache"])
    logits_BxPxV, upd = model.apply(
        {"params": params, "cache": cache}, prompt_BxP, positions_BxS[:, :P], mutable=["cache"]
    )
    cache = upd["cache"]
    last_BxV = logits_BxPxV[rows_B, lengths_B - 1]
  else:
    cache = None
    last_BxV = model.apply({"params": params}, tokens_BxS)[rows_B, lengths_B - 1]

  def step(state):
    t, tokens_BxS, cache, last_BxV, done_B = state
    pos_B = lengths_B + t
    new_B = jnp.where(done_B, eos_id, _pick(last_BxV, jax.random.fold_in(key, t), knobs))
    tokens_BxS = tokens_BxS.at[rows_B, pos_B].set(new_B)
    done_B = done_B | (new_B == eos_id)
    if use_cache:
      logits_Bx1xV, upd = model.apply(
          {"params": params, "cache": cache}, new_B[:, None], pos_B[:, None], mutable=["cache"]
      )
      cache, last_BxV = upd["cache"], logits_Bx1xV[:, 0]
    else:
      last_BxV = model.apply({"params": params}, tokens_BxS)[rows_B, pos_B]
    return t + 1, tokens_BxS, cache, last_BxV, done_B

  def more(state):
    return (state[0] < max_new) & ~jnp.all(state[4])

  t, tokens_BxS, _, _, _ = jax.lax.while_loop(more, step, (jnp.int32(0), tokens_BxS, cache, last_BxV, done_B))
  return tokens_BxS, t


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())  # powers of two: few compiled shapes


def generate(
    cfg,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
  """The tokens generated after each prompt, up to and including the first `eos_id` (transformers' `generate`
  output without the prompt and the padding). Prompts must be non-empty and fit the model's window with
  max_new_tokens after them; callers left-truncate (the harness does). `params` may be scanned. Batch size,
  prompt length and total length are padded to powers of two, so calls share compiled decoders."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > cfg.n_positions:
    raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new ones exceeds n_positions={cfg.n_positions}")
  total = min(cfg.n_positions, _bucket(max(16, longest + max_new_tokens)))  # GPT-2's position table ends there
  P = min(_bucket(max(8, longest)), total - max_new_tokens)
  cfg, params = unrolled(cfg, params)
  B = _bucket(len(prompts))
  prompt_BxP = np.zeros((B, P), np.int32)
  lengths_B = np.ones((B,), np.int32)
  for b, p in enumerate(prompts):
    prompt_BxP[b, : len(p)], lengths_B[b] = p, len(p)
  knobs = (
      np.bool_(sampling.do_sample),
      np.float32(sampling.temperature),
      np.int32(sampling.top_k),
      np.float32(sampling.top_p),
  )
  tokens_BxS, _ = jax.device_get(
      _generate(
          cfg,
          params,
          prompt_BxP,
          lengths_B,
          np.arange(B) >= len(prompts),
          jax.random.PRNGKey(seed),
          np.int32(eos_id),
          np.int32(max_new_tokens),
          knobs,
          total=total,
          use_cache=use_cache,
      )
  )
  out = []
  for b, p in enumerate(prompts):
    new = tokens_BxS[b, len(p) : len(p) + max_new_tokens].tolist()
    out.append(new[: new.index(eos_id) + 1] if eos_id in new else new)
  return out
