"""A Mosaic GPU (Pallas) kernel for the angular dispersion terms: cosine tiles, clamp, arccos, exp and row sums in
registers, one bf16 W tile stored per (query tile, key tile); U = W @ zp is one XLA batched matmul.

Design (shared/docs/fused-dispersion.md, plan B): per sequence b and tile (I, J) of the [L, L] pair matrix
  K1 (this kernel): c = zp_I zp_J^T (wgmma, bf16 operands, f32 accumulator, K-loop over F through a TMA pipeline);
      c~ = clip(c, -1+t, 1-t); r = rsqrt(1 - c~^2); D = acos_poly(c~) / pi; pair = code_r_i == code_c_j, i != j;
      angular_spread:    e = exp((D_min - D) / tau) (static shift: D >= D_min = acos(1-t)/pi, no running max),
                         row sums of e, W = e * r;
      orthogonalization: h = max(margin - D, 0), row sums of h^2, W = h * r.
  K2 (XLA): U = W @ zp (bf16 x bf16 -> f32).  The custom_vjp's backward is then a per-sequence scale of U.
Evaluation without gradient runs a sum-only K1 (no W store, no K2).

Precision, measured against float64 on CPU (B=2, L=1024, F=768, t=0.1; random and condensed states, cos ~0.9 with
13 % of pairs clamped; tau 1 and 0.1), by emulating the operand roundings of this design:
  bf16 Gram + bf16 W + bf16 K2 (chosen): loss rel. error <= 1.0e-5, |dgrad|/|grad| 2.6e-4 .. 1.0e-3, cosine >= 0.9999995
  TF32 Gram + bf16 W + bf16 K2:          loss rel. error <= 6.1e-6, |dgrad|/|grad| 2.6e-4 .. 3.1e-4
  f32 (no tensor cores):                 loss rel. error <= 2.9e-6, |dgrad|/|grad| <= 1.8e-7
The W / K2 rounding dominates except for condensed states at small tau; TF32 would halve the wgmma rate for at
most 3x less gradient error, below the bf16 rounding of the model's own activations and gradients: bf16 it is.
acos: Mosaic GPU has no acos lowering; the kernel uses dispersion_fused.acos_poly (A&S 4.4.46, max |error| 4.6e-7
in float32, three orders of magnitude below the bf16 Gram error; its doc has the comparison).

Lowering: the kernel lowers for CUDA on a CPU-only jaxlib (`jax.jit(f).trace(...).lower(lowering_platforms=
("cuda",))`); `interpret=True` runs it in Mosaic GPU interpret mode on CPU (a private jax API; the interpreter
supports neither register layouts nor transposed SMEM operands, so that mode reads the register layouts from plain
SMEM loads and the key operand from a pre-transposed copy). End to end in interpret mode (L 70..256, masks,
segments, tau 0.5): loss rel. error <= 4.7e-5 and |dgrad|/|grad| <= 1.7e-3 against float64.
"""

import functools
import math

import jax
import jax.numpy as jnp

from dispersion_jax.losses.dispersion_fused import acos_poly

KERNEL_VARIANTS: tuple[str, ...] = ("angular_spread", "orthogonalization")
TILE_M, TILE_N = 64, 64  # one warpgroup per CTA; 128-wide key tiles lower too (see tests); tune on the GPU
TRANSPOSE_IN_KERNEL = True  # hardware: wgmma reads zp_J^T through transpose_ref (no XLA transpose of zp)


def _d_min(t: float) -> float:
  return math.acos(1.0 - t) / math.pi


def _gram_epilogue(
    zb,
    code_r,
    code_c,
    *,
    variant: str,
    tau: float,
    t: float,
    margin: float,
    store_w: bool,
    tile_m: int = TILE_M,
    tile_n: int = TILE_N,
    interpret: bool = False,
    transpose_in_kernel: bool = TRANSPOSE_IN_KERNEL,
    semantics=None,
):
  """K1: zb [B, L, F] bf16 (L % tile == 0, F % 64 == 0), codes [B, L] int32 -> (W [B, L, L] bf16 | None, rs).

  rs [B, L // tile_n, L] f32: per key tile J, the row sums over that tile (sum over axis 1 gives the row sums).
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax import lax

  B, L, F = zb.shape
  tile_k = 128 // zb.dtype.itemsize  # one 128-byte swizzle row of the K dimension per pipeline step
  if L % tile_m or L % tile_n or F % tile_k:
    raise ValueError(f"pad first: L={L} must be a multiple of {tile_m} and {tile_n}, F={F} of {tile_k}")
  n_i, n_j, n_k = L // tile_m, L // tile_n, F // tile_k
  d_min = _d_min(t)
  tr = (plgpu.TilingTransform((8, tile_k)), plgpu.SwizzleTransform(128))
  transpose_in_kernel = transpose_in_kernel and not interpret

  def body(zq_g, zk_g, cr_g, cc_g, *outs, rs_smem, cr_smem, cc_smem, bar, w_smem=None):
    w_g, rs_g = outs if store_w else (None, *outs)
    b, i, j = lax.axis_index("b"), lax.axis_index("i"), lax.axis_index("j")
    rows, cols = pl.ds(i * tile_m, tile_m), pl.ds(j * tile_n, tile_n)
    plgpu.copy_gmem_to_smem(cr_g.at[b, rows], cr_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(cc_g.at[b, cols], cc_smem, bar.at[1])

    def gram(acc):
      def step(_, q_smem, k_smem):
        plgpu.wgmma(acc, q_smem, plgpu.transpose_ref(k_smem, (1, 0)) if transpose_in_kernel else k_smem)
        plgpu.wgmma_wait(1)

      k_spec = (
          plgpu.BlockSpec((tile_n, tile_k), lambda k: (j, k), transforms=tr, delay_release=1)
          if transpose_in_kernel
          else plgpu.BlockSpec((tile_k, tile_n), lambda k: (k, j), transforms=tr, delay_release=1)
      )
      plgpu.emit_pipeline(
          step,
          grid=(n_k,),
          max_concurrent_steps=2,
          in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda k: (i, k), transforms=tr, delay_release=1), k_spec],
      )(zq_g.at[b], zk_g.at[b])
      return acc[...]

    c = jnp.clip(pl.run_scoped(gram, plgpu.ACC((tile_m, tile_n), jnp.float32)), -1.0 + t, 1.0 - t)
    dist = acos_poly(c) * (1.0 / math.pi)
    plgpu.barrier_wait(bar.at[0])
    plgpu.barrier_wait(bar.at[1])
    if interpret:  # the GPU interpreter has no register layouts
      cr, cc = cr_smem[...], cc_smem[...]
      ii = lax.broadcasted_iota(jnp.int32, (tile_m, tile_n), 0)
      jj = lax.broadcasted_iota(jnp.int32, (tile_m, tile_n), 1)
    else:
      cr = plgpu.load(cr_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
      cc = plgpu.load(cc_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
      ii = plgpu.broadcasted_iota(jnp.int32, (tile_m, tile_n), 0, layout=plgpu.Layout.WGMMA)
      jj = plgpu.broadcasted_iota(jnp.int32, (tile_m, tile_n), 1, layout=plgpu.Layout.WGMMA)
    pair = (lax.broadcast_in_dim(cr, (tile_m, tile_n), [0]) == lax.broadcast_in_dim(cc, (tile_m, tile_n), [1])) & (
        ii + i * tile_m != jj + j * tile_n
    )
    if variant == "angular_spread":
      v = jnp.where(pair, jnp.exp((d_min - dist) * (1.0 / tau)), 0.0)
      rs_smem[...] = jnp.sum(v, axis=1)
    else:
      v = jnp.where(pair, jnp.maximum(margin - dist, 0.0), 0.0)
      rs_smem[...] = jnp.sum(v * v, axis=1)
    if store_w:
      w_smem[...] = (v * lax.rsqrt(1.0 - c * c)).astype(w_smem.dtype)
    plgpu.commit_smem()
    if store_w:
      plgpu.copy_smem_to_gmem(w_smem, w_g.at[b, rows, cols])
    plgpu.copy_smem_to_gmem(rs_smem, rs_g.at[b, j, rows])
    plgpu.wait_smem_to_gmem(0)

  rs_type = jax.ShapeDtypeStruct((B, n_j, L), jnp.float32)
  scratch = dict(
      rs_smem=plgpu.SMEM((tile_m,), jnp.float32),
      cr_smem=plgpu.SMEM((tile_m,), jnp.int32),
      cc_smem=plgpu.SMEM((tile_n,), jnp.int32),
      bar=plgpu.Barrier(num_barriers=2),
  )
  out_type = rs_type
  if store_w:
    out_type = (jax.ShapeDtypeStruct((B, L, L), jnp.bfloat16), rs_type)
    w_tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch["w_smem"] = plgpu.SMEM((tile_m, tile_n), jnp.bfloat16, transforms=w_tr)
  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private: tests on CPU only

    kwargs["interpret"] = InterpretGPUParams()
  params = plgpu.CompilerParams(**({} if semantics is None else dict(lowering_semantics=semantics)))
  kernel = plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch,
      grid=(B, n_i, n_j),
      grid_names=("b", "i", "j"),
      compiler_params=params,
      **kwargs,
  )
  keys = zb if transpose_in_kernel else zb.swapaxes(1, 2)
  out = kernel(zb, keys, code_r, code_c)
  return out if store_w else (None, out)


def _pad(zp, code_r, code_c, tile: int, tile_k: int):
  B, L, F = zp.shape
  pl_, pf = -L % tile, -F % tile_k  # padded tokens pair with nothing; zero features change no cosine
  zb = jnp.pad(zp, ((0, 0), (0, pl_), (0, pf))).astype(jnp.bfloat16)
  return (
      zb,
      jnp.pad(code_r, ((0, 0), (0, pl_)), constant_values=-1),
      jnp.pad(code_c, ((0, 0), (0, pl_)), constant_values=-2),
  )


def _kernel_terms(variant, p, interpret, zp, code_r, code_c, grad: bool):
  L = zp.shape[1]
  zb, cr, cc = _pad(zp, code_r, code_c, max(TILE_M, TILE_N), 64)
  w, rs = _gram_epilogue(
      zb,
      cr,
      cc,
      variant=variant,
      tau=p.tau_cos,
      t=p.clamp_threshold,
      margin=p.margin,
      store_w=grad,
      tile_m=TILE_M,
      tile_n=TILE_N,
      interpret=interpret,
  )
  total = jnp.sum(rs, axis=(1, 2))
  # The static shift bounds every logit, never the logsumexp: total may be < 1 (few pairs, small tau) and is used as
  # is (value log(total) - D_min / tau, gradient e / total). Each e >= exp(-80) > float32's tiny (pair_sums refuses
  # larger spans), so total > 0 exactly when the sequence has a pair.
  if variant == "angular_spread":
    val = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) - _d_min(p.clamp_threshold) / p.tau_cos, 0.0)
  else:
    val = total
  val = val.astype(zp.dtype)
  if not grad:
    return val, None
  u = jnp.einsum("blm,bmf->blf", w, zb, preferred_element_type=jnp.float32)[:, :L, : zp.shape[2]]
  if variant == "angular_spread":
    coef = 2.0 / (math.pi * p.tau_cos)
    res = (coef / jnp.where(total > 0, total, 1.0))[:, None, None] * u
  else:
    res = (4.0 / math.pi) * u
  return val, res.astype(zp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 5))
def _pair_sums(variant, p, zp, code_r, code_c, interpret):
  return _kernel_terms(variant, p, interpret, zp, code_r, code_c, grad=False)[0]


def _pair_sums_fwd(variant, p, zp, code_r, code_c, interpret):
  return _kernel_terms(variant, p, interpret, zp, code_r, code_c, grad=True)


def _pair_sums_bwd(variant, p, interpret, res, g_B):
  return g_B[:, None, None].astype(res.dtype) * res, None, None


_pair_sums.defvjp(_pair_sums_fwd, _pair_sums_bwd)


def pair_sums(variant: str, p, zp, code_r, code_c, *, interpret: bool = False):
  """dispersion_fused.pair_sums for the kernel variants: out_b [B] (angular: logsumexp over pairs of -D/tau;
  orthogonalization: sum over pairs of max(margin - D, 0)^2), gradient formed in the forward pass."""
  if variant not in KERNEL_VARIANTS:
    raise ValueError(f"no dispersion kernel for {variant!r}; kernels exist for {', '.join(KERNEL_VARIANTS)}")
  if variant == "angular_spread" and (1.0 - 2.0 * _d_min(p.clamp_threshold)) / p.tau_cos > 80.0:
    raise ValueError(
        f"tau_cos={p.tau_cos} is too small for the kernel's static shift (exp underflows in float32): " "use impl='xla'"
    )
  return _pair_sums(variant, p, zp, code_r, code_c, interpret)
