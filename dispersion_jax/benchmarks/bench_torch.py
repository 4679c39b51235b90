"""PyTorch baseline for `bench.py`: Hugging Face GPT-2 (sdpa attention) + the dispersion loss written from the spec.

This is what the paper's authors run (HF GPT-2, eager, optionally torch.compile): same shapes, random init, AdamW
with global-norm clipping, CE + coeff * mean dispersion over hidden_states[1:] (blocks 1..n-1 and the final one
after ln_f). torch and transformers are optional extras (requirements-bench.txt).
"""

import math
import time
from typing import Any, Callable

from dispersion_jax.errors import ConfigError


def require_torch():
  """(torch, transformers), or a one-line error naming the install command."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ConfigError(
        f"--torch_baseline needs torch and transformers: pip install -r requirements-bench.txt ({e})"
    ) from None
  return torch, transformers


def dispersion_loss(
    z_BxLxF,
    variant: str = "angular_spread",
    *,
    tau_l2: float = 1.0,
    tau_cos: float = 1.0,
    margin: float = 0.5,
    epsilon: float = 1e-2,
    clamp_threshold: float = 0.25,
    max_tokens: int | None = None,
):
  """The five variants of shared/docs/dispersion-spec.md, dense per sequence, pairwise part in float32 (or wider)."""
  torch, _ = require_torch()
  z = z_BxLxF if z_BxLxF.dtype == torch.float64 else z_BxLxF.float()
  B, L, F = z.shape
  if max_tokens is not None and max_tokens < L:  # one random subset shared by the batch, fresh each call
    keep = torch.randperm(L, device=z.device)[:max_tokens].sort().values
    z, L = z[:, keep], max_tokens
  eye_LxL = torch.eye(L, dtype=torch.bool, device=z.device)
  n_off = L * (L - 1)

  def sq_dist(a):
    n = (a * a).sum(-1)
    return (n[:, :, None] + n[:, None, :] - 2.0 * a @ a.transpose(1, 2)).clamp_min(0.0)

  def ang_dist(a):
    zn = a / (a.norm(dim=-1, keepdim=True) + epsilon)
    c = zn @ zn.transpose(1, 2)
    c_st = c + (c.clamp(-1.0 + clamp_threshold, 1.0 - clamp_threshold) - c).detach()
    return torch.arccos(c_st) / math.pi

  if variant == "decorrelation":
    zs = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True)  # unbiased std, as the reference
    c = zs @ zs.transpose(1, 2) / (F - 1)
    return ((c * c).masked_fill(eye_LxL, 0.0).sum((1, 2)) / n_off).mean()
  if variant == "l2_repel":
    lse_B = torch.logsumexp((-sq_dist(z) / tau_l2 + epsilon).reshape(B, -1), dim=-1)
    return (lse_B - math.log(L * L)).mean() + 0.1 * (z * z).mean()
  if variant == "angular_spread":
    logits = (-ang_dist(z) / tau_cos + epsilon).masked_fill(eye_LxL, float("-inf"))
    return (torch.logsumexp(logits.reshape(B, -1), dim=-1) - math.log(n_off)).mean()
  if variant == "orthogonalization":
    hinge = (margin - ang_dist(z)).clamp_min(0.0)
    return ((hinge * hinge).masked_fill(eye_LxL, 0.0).sum((1, 2)) / n_off).mean()
  if variant == "perplexity_entropy":
    p = torch.softmax((-sq_dist(z) / tau_l2).masked_fill(eye_LxL, float("-inf")), dim=-1)
    h_BxL = -(p * torch.log2(p + epsilon)).sum(-1)
    return -h_BxL.mean()
  raise ValueError(f"unknown dispersion variant {variant!r}")


def _model(torch, transformers, *, layers: int, dim: int, heads: int, vocab: int, n_positions: int):
  cfg = transformers.GPT2Config(
      n_layer=layers,
      n_embd=dim,
      n_head=heads,
      vocab_size=vocab,
      n_positions=n_positions,
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      bos_token_id=0,
      eos_token_id=0,
  )
  return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


def prepare(
    *,
    layers: int,
    dim: int,
    heads: int,
    vocab: int,
    seq: int,
    batch: int,
    variant: str,
    coeff: float,
    max_tokens: int | None,
    compile: bool = False,
    warmup: int = 1,
    n_positions: int = 1024,
    clamp_threshold: float = 0.1,
    seed: int = 0,
) -> tuple[dict[str, Any], Callable[[], None]]:
  """One HF GPT-2 training step (forward, backward, clip, AdamW) on the same shapes, warmed up; returns
  (row facts, run-one-step-and-wait)."""
  torch, transformers = require_torch()
  torch.manual_seed(seed)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = (
      _model(torch, transformers, layers=layers, dim=dim, heads=heads, vocab=vocab, n_positions=n_positions)
      .to(dev)
      .train()
  )
  decay = [p for p in model.parameters() if p.dim() >= 2]  # as the JAX step: no decay on biases / LN
  rest = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
      lr=3e-4,
      betas=(0.9, 0.95),
      eps=1e-8,
  )
  ids = torch.randint(0, vocab, (batch, seq + 1), device=dev)
  inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
  amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

  def loss_fn(inputs, targets):
    with amp:
      out = model(inputs, output_hidden_states=coeff != 0.0)
    ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, vocab), targets.reshape(-1))
    if coeff == 0.0:
      return ce
    disp = [
        dispersion_loss(h, variant, clamp_threshold=clamp_threshold, max_tokens=max_tokens)
        for h in out.hidden_states[1:]
    ]
    return ce + coeff * torch.stack(disp).mean()

  fwd = torch.compile(loss_fn) if compile else loss_fn
  row: dict[str, Any] = {}

  def one_step():
    loss = fwd(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    row["loss"] = loss.item()  # waits for the device

  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  one_step()  # first step: torch.compile's compile time, allocator warm-up
  first_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    one_step()
  n_params = sum(p.numel() for p in model.parameters())
  row.update(
      compile_s=first_s if compile else None,
      first_step_s=first_s,
      params=n_params,
      peak_memory_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
      torch_version=torch.__version__,
      transformers_version=transformers.__version__,
      torch_threads=torch.get_num_threads(),
      device_torch=str(dev),
      compute_dtype="bfloat16" if dev.type == "cuda" else "float32",
  )
  return row, one_step
