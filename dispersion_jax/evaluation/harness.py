"""Our models as an lm-evaluation-harness language model (`lm_eval.api.model.TemplateLM`).

- `loglikelihood`: the harness's own TemplateLM tokenizes (its context/continuation split, its empty-context rule
  with `prefix_token_id`); `_loglikelihood_tokens` then scores the requests as its `HFLM` does: input
  `(context + continuation)[-(max_length + 1):][:-1]` (left truncation), sum of the continuation's log-softmax
  and whether every continuation token is the argmax. Requests run longest first in batches of `batch_size`
  rows, padded on the right to a power-of-two length, so one jitted function compiles once per length bucket;
  rows are sharded over the mesh's data axes.
- `loglikelihood_rolling`: the harness's `get_rolling_token_windows` / `make_disjoint_window` (as HFLM), each
  window scored by `_loglikelihood_tokens`, summed per document.
- `generate_until`: decode.generate (KV cache) per group of equal generation kwargs, contexts left-truncated to
  `max_length - max_gen_toks`, the text cut at the first stop sequence (the harness's own helpers).

Multi-process: every process holds the model; process 0 runs the harness and, before each jitted call, sends the
call's inputs to the others (`multihost_utils.broadcast_one_to_all`); the others run `serve()`, which makes the
same calls until process 0's `close()`. So all processes enter every collective in the same order.
"""

import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from dispersion_jax.evaluation import decode
from dispersion_jax.models import build_model, lm_head
from dispersion_jax.parallel import sharding

_HEADER_BYTES = 4096  # one fixed-size broadcast carries each call's kind and argument shapes


@functools.cache
def _score_fn(cfg, mesh):
  model = build_model(cfg)
  acc = jnp.promote_types(cfg.dtype, jnp.float32)

  def score(params, ids_BxT, start_B, targets_BxC, cont_BxC):
    """Sum of log p(target) over each row's continuation (C positions from start_B) and whether all are argmax.
    Only those C positions go through the LM head: XLA drops the model's own [B, T, V] logits, unused here, so
    the head (most of the FLOPs at a 50k vocabulary) costs C / T of a full forward."""
    _, inter = model.apply({"params": params}, ids_BxT, mutable=["intermediates"])
    final_BxTxD = inter["intermediates"]["final"][0]
    pos_BxC = jnp.minimum(start_B[:, None] + jnp.arange(targets_BxC.shape[1]), ids_BxT.shape[1] - 1)
    h_BxCxD = jnp.take_along_axis(final_BxTxD, pos_BxC[..., None], axis=1).astype(cfg.dtype)
    # The head exactly as the models apply it: compute dtype in, float32 (or wider) accumulation.
    logits_BxCxV = jnp.einsum("bcd,vd->bcv", h_BxCxD, lm_head(params, cfg), preferred_element_type=acc)
    logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)  # HFLM's F.log_softmax
    tgt_BxC = jnp.take_along_axis(logp_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    greedy_BxC = jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC
    return jnp.sum(jnp.where(cont_BxC, tgt_BxC, 0.0), -1), jnp.all(greedy_BxC | ~cont_BxC, -1)

  return jax.jit(score, out_shardings=sharding.replicated(mesh))


def _bucket(n: int, cap: int) -> int:
  return min(cap, max(16, 1 << (n - 1).bit_length()))


class JaxLM(TemplateLM):
  """An lm_eval model over (model config, params, tokenizer); params may be sharded (a live training state)."""

  def __init__(
      self,
      cfg,
      params: Any,
      tokenizer: Any,
      *,
      mesh=None,
      batch_size: int = 16,
      max_length: int | None = None,
      max_gen_toks: int = 256,
      seed: int = 0,
  ):
    super().__init__()
    self.cfg, self.tokenizer_ = cfg, tokenizer
    self.mesh = mesh if mesh is not None else sharding.make_mesh(sharding.MeshConfig(), jax.devices())
    rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = -(-batch_size // rows) * rows  # a multiple of the data-parallel width
    self._max_length = min(max_length or cfg.n_positions, cfg.n_positions)
    self._max_gen_toks, self.seed = max_gen_toks, seed
    self.params = _on_mesh(params, self.mesh)
    self.lead = jax.process_index() == 0
    self._multi = jax.process_count() > 1

  # ------------------------------------------------------------------------------------------- tokens
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # HFLM adds no special tokens for causal models unless asked to add a BOS
    return self.tokenizer_.encode(string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer_.decode(tokens)

  # ------------------------------------------------------------------------------------------- calls
  def _call(self, kind: str, arrays: dict[str, np.ndarray], meta: dict | None = None):
    """Run one jitted call here and, multi-process, on every other process (which are in `serve()`)."""
    if self._multi:
      _broadcast_call(kind, arrays, meta or {})
    return self._execute(kind, arrays, meta or {})

  def _execute(self, kind: str, arrays: dict[str, np.ndarray], meta: dict):
    if kind == "score":
      batch = sharding.batch_sharding(self.mesh)
      args = (_global(arrays[k], batch) for k in ("ids", "start", "targets", "cont"))
      return jax.device_get(_score_fn(self.cfg, self.mesh)(self.params, *args))
    if kind == "generate":
      prompts = [row[:n].tolist() for row, n in zip(arrays["prompts"], arrays["lengths"])]
      sampling = decode.Sampling(**meta["sampling"])
      return decode.generate(self.cfg, self.params, prompts, meta["max_new"], self.eot_token_id, sampling, meta["seed"])
    raise ValueError(f"unknown harness call {kind!r}")

  def serve(self) -> None:
    """Processes other than 0: make process 0's calls until it closes (single process: returns at once)."""
    if not self._multi or self.lead:
      return
    while True:
      kind, arrays, meta = _broadcast_call(None, None, None)
      if kind == "close":
        return
      self._execute(kind, arrays, meta)

  def close(self) -> None:
    """Process 0: release the processes in `serve()`."""
    if self._multi and self.lead:
      _broadcast_call("close", {}, {})

  # ------------------------------------------------------------------------------------------- scoring
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    n_pos = self.max_length
    rows = []
    for r, (_, ctx, cont) in enumerate(requests):
      if not cont or len(cont) > n_pos:
        raise ValueError(f"request {r}: a continuation of {len(cont)} tokens; it needs 1..{n_pos}")
      if max(max(ctx, default=0), max(cont)) >= self.cfg.vocab_size or min(min(ctx, default=0), min(cont)) < 0:
        raise ValueError(
            f"request {r}: a token id outside the model vocabulary [0, {self.cfg.vocab_size}): wrong tokenizer?"
        )
      whole = (list(ctx) + list(cont))[-(n_pos + 1) :]
      rows.append((r, whole[:-1], whole[1:], len(cont)))
    rows.sort(key=lambda row: -len(row[1]))  # longest first, as HFLM: similar lengths share a padded batch
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    B = self.batch_size
    for start in tqdm(range(0, len(rows), B), disable=disable_tqdm or not self.lead, desc="loglikelihood"):
      chunk = rows[start : start + B]
      T = _bucket(len(chunk[0][1]), n_pos)
      C = _bucket(max(row[3] for row in chunk), n_pos)
      ids_BxT, start_B = np.zeros((B, T), np.int32), np.zeros((B,), np.int32)
      tgt_BxC, cont_BxC = np.zeros((B, C), np.int32), np.zeros((B, C), bool)
      for b, (_, inp, tgt, n_cont) in enumerate(chunk):
        ids_BxT[b, : len(inp)], start_B[b] = inp, len(inp) - n_cont
        tgt_BxC[b, :n_cont], cont_BxC[b, :n_cont] = tgt[-n_cont:], True
      arrays = {"ids": ids_BxT, "start": start_B, "targets": tgt_BxC, "cont": cont_BxC}
      ll_B, greedy_B = self._call("score", arrays)
      for b, row in enumerate(chunk):
        out[row[0]] = (float(ll_B[b]), bool(greedy_B[b]))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for ctx, cont in map(
          lm_utils.make_disjoint_window,
          lm_utils.get_rolling_token_windows(
              token_list=self.tok_encode(text),
              prefix_token=self.prefix_token_id,
              max_seq_len=self.max_length,
              context_len=1,
          ),
      ):
        windows.append((None, ctx, cont))
        owner.append(i)
    totals = np.zeros(len(requests), np.float64)
    for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
      totals[i] += ll
    return totals.tolist()

  # ------------------------------------------------------------------------------------------- generation
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos = self.tok_decode([self.eot_token_id])
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):  # one decoding mode per batch, as HFLM's grouping by gen_kwargs
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out = [""] * len(requests)
    for members in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_new = kwargs.pop("max_gen_toks")
      if max_new >= self.max_length:
        raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
      sampling = _sampling(kwargs)
      keep = self.max_length - max_new
      for start in range(0, len(members), self.batch_size):
        idx = members[start : start + self.batch_size]
        prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-keep:] for i in idx]
        width = max(map(len, prompts))
        arr = np.zeros((len(prompts), width), np.int32)
        for b, p in enumerate(prompts):
          arr[b, : len(p)] = p
        meta = {"sampling": sampling, "max_new": max_new, "seed": self.seed + start}
        gens = self._call("generate", {"prompts": arr, "lengths": np.asarray([len(p) for p in prompts])}, meta)
        for i, toks in zip(idx, gens):
          out[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
    return out


def _sampling(kwargs: dict) -> dict:
  """decode.Sampling's fields from normalized harness generation kwargs (greedy unless do_sample)."""
  if not kwargs.get("do_sample"):
    return {"do_sample": False}
  return {
      "do_sample": True,
      "temperature": float(kwargs.get("temperature") or 1.0),
      "top_k": int(kwargs.get("top_k") or 0),
      "top_p": float(kwargs.get("top_p") or 1.0),
  }


def _on_mesh(params: Any, mesh) -> Any:
  """Params as they are if they already live on the mesh's devices (a live training state), else replicated
  over the mesh (a checkpoint or HF model read onto one device)."""
  devices = set(mesh.devices.flat)
  if all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in jax.tree.leaves(params)):
    return params
  return jax.device_put(params, sharding.replicated(mesh))


def _global(x: np.ndarray, sharding_) -> jax.Array:
  """A global array from a host array every process holds in full (multi-process: each takes its own rows)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding_)
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def _broadcast_call(kind, arrays, meta):
  """Process 0 sends (kind, arrays, meta); the others pass None and receive them."""
  from jax.experimental import multihost_utils

  header = np.zeros(_HEADER_BYTES, np.uint8)
  if kind is not None:
    spec = {k: (list(v.shape), str(v.dtype)) for k, v in arrays.items()}
    text = json.dumps({"kind": kind, "spec": spec, "meta": meta}).encode()
    if len(text) > _HEADER_BYTES:
      raise ValueError(f"harness call header of {len(text)} bytes exceeds {_HEADER_BYTES}")
    header[: len(text)] = np.frombuffer(text, np.uint8)
  header = np.asarray(multihost_utils.broadcast_one_to_all(header))
  msg = json.loads(bytes(header[header > 0]).decode())
  if kind is None:
    arrays = {k: np.zeros(shape, dtype) for k, (shape, dtype) in msg["spec"].items()}
  got = multihost_utils.broadcast_one_to_all(arrays) if arrays else {}
  return msg["kind"], {k: np.asarray(v) for k, v in got.items()}, msg["meta"]
