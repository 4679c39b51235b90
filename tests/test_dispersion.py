"""The dispersion losses against the authors' float64 goldens, and the behaviour the reference lacks."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dispersion_jax import VARIANTS, dispersion_loss


def _rand(shape, seed=0, dtype=np.float64):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


@pytest.mark.parametrize("block_size", [None, 16])
def test_matches_reference_values_and_gradients(x64, disp_golden, block_size):
  meta, arrays = disp_golden
  assert len(meta["entries"]) == 45
  for e in meta["entries"]:
    if block_size is not None and e["setting"] != 1:
      continue  # the blocked path on one setting suffices here: it is checked against the dense one below
    kw = meta["settings"][e["setting"]]
    prefix = f"{e['case']}/{e['variant']}/s{e['setting']}"
    z = arrays[f"{e['case']}/z"]
    value, grad = jax.value_and_grad(lambda z: dispersion_loss(z, e["variant"], block_size=block_size, **kw))(z)
    assert value.dtype == jnp.float64
    # rtol 1e-5: the reference builds log(L^2) / log(L(L-1)) as float32 constants (spec, "Note for parity").
    np.testing.assert_allclose(value, arrays[f"{prefix}/loss"], rtol=1e-5, err_msg=prefix)
    ref_grad = arrays[f"{prefix}/grad"]
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-12 * np.abs(ref_grad).max(), err_msg=prefix)


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    z = jnp.asarray(_rand((2, 12, 8), dtype=np.float32))
    for variant in VARIANTS:
      fn = self.variant(lambda z, v=variant: dispersion_loss(z, v, block_size=None))
      chex.assert_trees_all_close(fn(z), dispersion_loss(z, variant, block_size=5), rtol=1e-5)
      chex.assert_shape(fn(z), ())
      chex.assert_tree_all_finite(fn(z))


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocked_equals_dense_with_mask_and_segments(x64, variant):
  z = _rand((3, 37, 6), seed=1)
  mask = np.ones((3, 37), bool)
  mask[1, 30:] = False
  seg = np.repeat(np.arange(3)[None], 37 // 3 + 1, 0).T.reshape(-1)[:37][None].repeat(3, 0)
  f = lambda z, bs: dispersion_loss(z, variant, block_size=bs, mask=mask, segment_ids=seg)
  v_dense, g_dense = jax.value_and_grad(f)(z, None)
  v_blk, g_blk = jax.value_and_grad(f)(z, 8)  # 37 rows: 5 blocks, the last one padded
  np.testing.assert_allclose(v_blk, v_dense, rtol=1e-12)
  np.testing.assert_allclose(g_blk, g_dense, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mask_all_true_equals_unmasked_and_masked_tokens_get_no_gradient(x64, variant):
  z = _rand((2, 10, 5), seed=2)
  full = dispersion_loss(z, variant)
  np.testing.assert_allclose(dispersion_loss(z, variant, mask=np.ones((2, 10), bool)), full, rtol=1e-12)
  # Sequence 0 keeps 7 tokens, sequence 1 keeps 4: the value is the mean of the two trimmed sequences' losses.
  lengths = [7, 4]
  mask = np.arange(10)[None] < np.array(lengths)[:, None]
  value, grad = jax.value_and_grad(lambda z: dispersion_loss(z, variant, mask=mask))(z)
  if variant == "l2_repel":  # its 0.1 * mean(z^2) term is over the whole (masked) batch, not per sequence
    norm = lambda zz: 0.1 * np.mean(zz**2)
    per_seq = [float(dispersion_loss(z[b : b + 1, :n], variant)) - norm(z[b, :n]) for b, n in enumerate(lengths)]
    expected = np.mean(per_seq) + 0.1 * np.sum(z[mask] ** 2) / (mask.sum() * z.shape[-1])
  else:
    expected = np.mean([float(dispersion_loss(z[b : b + 1, :n], variant)) for b, n in enumerate(lengths)])
  np.testing.assert_allclose(value, expected, rtol=1e-10)
  assert np.all(grad[~mask] == 0) and np.any(grad[mask])


@pytest.mark.parametrize("variant", VARIANTS)
def test_segments_combine_like_separate_documents(x64, variant):
  """Pairs across documents are excluded: the loss over two documents is the pair-weighted merge of each."""
  z = _rand((1, 11, 4), seed=3)
  seg = np.array([[1] * 6 + [2] * 5])
  value = float(dispersion_loss(z, variant, segment_ids=seg))
  parts = [z[:, :6], z[:, 6:]]
  norm = lambda zz: 0.1 * np.mean(zz**2) if variant == "l2_repel" else 0.0
  v = [float(dispersion_loss(p, variant)) - norm(p) for p in parts]
  n = [6, 5]
  if variant in ("decorrelation", "orthogonalization"):
    pairs = [k * (k - 1) for k in n]
    expected = (v[0] * pairs[0] + v[1] * pairs[1]) / sum(pairs)
  elif variant == "angular_spread":
    pairs = [k * (k - 1) for k in n]
    expected = math.log((pairs[0] * math.exp(v[0]) + pairs[1] * math.exp(v[1])) / sum(pairs))
  elif variant == "l2_repel":
    pairs = [k * k for k in n]
    expected = math.log((pairs[0] * math.exp(v[0]) + pairs[1] * math.exp(v[1])) / sum(pairs)) + norm(z)
  else:  # perplexity_entropy: mean over rows
    expected = (v[0] * n[0] + v[1] * n[1]) / sum(n)
  np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_token_subsampling_is_reproducible_and_exact_on_the_kept_tokens(x64):
  z = _rand((3, 20, 6), seed=4)
  key = jax.random.PRNGKey(7)
  f = lambda z, k: dispersion_loss(z, "angular_spread", max_tokens=8, key=k)
  value, grad = jax.value_and_grad(f)(z, key)
  assert float(f(z, key)) == float(value)
  assert float(f(z, jax.random.PRNGKey(8))) != float(value)
  kept = np.abs(grad).sum(-1) > 0
  assert np.all(kept == kept[0]) and kept[0].sum() == 8  # one subset shared by the whole batch
  np.testing.assert_allclose(value, dispersion_loss(z[:, kept[0]], "angular_spread"), rtol=1e-12)
  np.testing.assert_allclose(dispersion_loss(z, max_tokens=20), dispersion_loss(z), rtol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_condensed_input_is_finite(variant):
  base = _rand((1, 1, 16), seed=5)
  z = (base + 1e-3 * _rand((2, 24, 16), seed=6)).astype(jnp.bfloat16)  # cosines ~1: arccos' is singular there
  for dtype in (jnp.bfloat16, jnp.float16):
    value, grad = jax.value_and_grad(lambda z: dispersion_loss(z.astype(dtype), variant))(jnp.asarray(z, jnp.float32))
    assert value.dtype == jnp.float32
    chex.assert_tree_all_finite((value, grad))


def test_reference_nan_cases_are_defined(x64):
  for variant in VARIANTS:
    value, grad = jax.value_and_grad(lambda z: dispersion_loss(z, variant))(_rand((2, 1, 4)))
    chex.assert_tree_all_finite((value, grad))
    if variant != "l2_repel":  # no pair at L = 1 (l2_repel keeps its diagonal pair)
      assert float(value) == 0.0 and not np.any(grad)
  z = _rand((1, 6, 5), seed=8)
  z[0, 2] = 3.0  # a constant token vector: zero variance, NaN in the reference
  value, grad = jax.value_and_grad(lambda z: dispersion_loss(z, "decorrelation"))(z)
  chex.assert_tree_all_finite((value, grad))
  np.testing.assert_allclose(value, float(dispersion_loss(np.delete(z, 2, 1), "decorrelation")) * 20 / 30)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(z=np.zeros((4, 3))), "shape \\[B, L, F\\]"),
        (dict(z=np.zeros((1, 4, 1))), "F >= 2"),
        (dict(variant="spread"), "unknown dispersion variant"),
        (dict(tau_cos=-1.0), "temperatures must be positive"),
        (dict(max_tokens=2), "pass key="),
        (dict(mask=np.ones((1, 3), bool)), "mask must have shape"),
    ],
)
def test_bad_inputs_raise_one_line_errors(kwargs, message):
  args = dict(z=np.zeros((1, 4, 3), np.float32), variant="angular_spread")
  args.update(kwargs)
  with pytest.raises(ValueError, match=message) as err:
    dispersion_loss(args.pop("z"), **args)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocked_path_needs_less_memory_than_dense(variant):
  """Peak temporary memory of value+grad from XLA's memory analysis (compiled, not run)."""

  def temp_bytes(shape, block_size):
    z = jax.ShapeDtypeStruct(shape, jnp.float32)
    fn = jax.jit(jax.value_and_grad(lambda z: dispersion_loss(z, variant, block_size=block_size)))
    return fn.lower(z).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes((8, 1024, 768), 128) <= temp_bytes((8, 1024, 768), None)
  # Where L x L dominates (long sequences, narrow models) the dense path is several times larger.
  assert 4 * temp_bytes((8, 4096, 256), 128) <= temp_bytes((8, 4096, 256), None)
