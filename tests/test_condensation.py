"""Condensation statistics vs a direct NumPy computation from the golden (HF, float64) hidden states; CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dispersion_jax.cli.condensation import main
from dispersion_jax.evaluation import condensation as cond
from dispersion_jax.interop.hf import load_gpt2

BINS = 100


@pytest.fixture(scope="module", autouse=True)
def x64_module():
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)


@pytest.fixture(scope="module")
def golden(gpt2_golden):
  d = gpt2_golden[1]
  return d["input_ids"], [d[f"hidden_states/{i}"] for i in range(4)]


@pytest.fixture(scope="module")
def tiny_dir(gpt2_golden):
  return gpt2_golden[0]


@pytest.fixture(scope="module")
def tiny64(x64_module, tiny_dir):
  return load_gpt2(tiny_dir, dtype="float64", param_dtype="float64")


def numpy_reference(states, lengths):
  """Per layer: mean of per-text means (with / without diagonal), histogram counts, all from scratch."""
  edges = np.linspace(-1, 1, BINS + 1)
  mean, off, counts = [], [], []
  for h in states:
    m, o, c = [], [], np.zeros(BINS, np.int64)
    for b, n in enumerate(lengths):
      x = h[b, :n] / np.linalg.norm(h[b, :n], axis=-1, keepdims=True)
      cos = np.clip(x @ x.T, -1, 1)
      m.append(cos.mean())
      o.append(cos[~np.eye(n, dtype=bool)].mean())
      c += np.histogram(cos.ravel(), bins=edges)[0]
    mean.append(np.mean(m))
    off.append(np.mean(o))
    counts.append(c)
  return np.array(mean), np.array(off), np.array(counts)


def check_summary(s, states, lengths):
  mean, off, counts = numpy_reference(states, lengths)
  np.testing.assert_allclose(s["mean_cossim_by_layer"], mean, rtol=0, atol=1e-10)
  np.testing.assert_allclose(s["mean_cossim_by_layer_offdiag"], off, rtol=0, atol=1e-10)
  np.testing.assert_array_equal(np.array(s["histograms"]["counts"]), counts)
  assert np.array(s["histograms"]["counts"]).sum(-1).tolist() == [sum(n * n for n in lengths)] * len(states)
  np.testing.assert_allclose(np.sum(np.array(s["histograms"]["density"]) * 2 / BINS, -1), 1.0)
  layers = np.arange(len(states))
  assert s["spearman"] == pytest.approx(scipy.stats.spearmanr(layers, mean).statistic, abs=1e-12)
  assert s["kendall"] == pytest.approx(scipy.stats.kendalltau(layers, mean).statistic, abs=1e-12)
  assert s["spearman_offdiag"] == pytest.approx(scipy.stats.spearmanr(layers, off).statistic, abs=1e-12)
  assert s["kendall_offdiag"] == pytest.approx(scipy.stats.kendalltau(layers, off).statistic, abs=1e-12)
  assert s["num_texts"] == len(lengths) and s["num_tokens"] == sum(lengths)


def test_model_statistics_match_golden_hidden_states(golden, tiny64):
  ids, states = golden
  cfg, params = tiny64
  s = cond.model_statistics(cfg, params, ids.tolist(), max_length=64, batch_size=2)
  check_summary(s, states, [40, 40])
  assert s["histograms"]["bin_edges"] == pytest.approx(np.linspace(-1, 1, BINS + 1).tolist())


def test_different_lengths_with_mask(golden, tiny64):
  ids, states = golden
  lengths = [25, 40]
  mask = np.arange(40)[None, :] < np.array(lengths)[:, None]
  # Pure batch path on the golden states themselves (padding = the states past each length).
  stats = jax.jit(cond.batch_statistics)(tuple(jnp.asarray(h) for h in states), jnp.asarray(mask))
  s = cond.summarize(cond.add_batch(cond.init_totals(4), jax.device_get(stats)))
  check_summary(s, states, lengths)
  # Model path, texts of different lengths in one padded batch (+ an empty batch row): the model is causal, so a
  # prefix's hidden states are the golden ones' prefix.
  cfg, params = tiny64
  s = cond.model_statistics(cfg, params, [ids[0, :25].tolist(), ids[1].tolist()], max_length=64, batch_size=3)
  check_summary(s, states, lengths)
  # Truncation to max_length.
  s = cond.model_statistics(cfg, params, ids.tolist(), max_length=25, batch_size=2)
  check_summary(s, states, [25, 25])


def test_running_sums_over_batches_equal_one_batch(golden, tiny64):
  ids, _ = golden
  texts = [ids[0, :n].tolist() for n in (3, 17, 40)] + [ids[1, :n].tolist() for n in (1, 2, 33)]
  one = cond.model_statistics(*tiny64, texts, max_length=64, batch_size=6)
  many = cond.model_statistics(*tiny64, texts, max_length=64, batch_size=4)
  np.testing.assert_allclose(many["mean_cossim_by_layer"], one["mean_cossim_by_layer"], atol=1e-12)
  np.testing.assert_allclose(many["mean_cossim_by_layer_offdiag"], one["mean_cossim_by_layer_offdiag"], atol=1e-12)
  assert many["histograms"]["counts"] == one["histograms"]["counts"]
  assert one["num_texts"] == 6  # the 1-token text counts for the with-diagonal mean only


def test_training_time_metrics_agree_with_full(golden):
  _, states = golden
  mask = np.arange(40)[None, :] < np.array([[25], [40]])
  h = tuple(jnp.asarray(x) for x in states)
  m = jax.jit(cond.condensation_metrics)(h, jnp.asarray(mask))
  full = cond.summarize(cond.add_batch(cond.init_totals(4), jax.device_get(cond.batch_statistics(h, mask))))
  got = [float(m[f"condensation/mean_cos/layer_{i}"]) for i in range(4)]
  np.testing.assert_allclose(got, full["mean_cossim_by_layer"], atol=1e-12)
  assert float(m["condensation/spearman"]) == pytest.approx(full["spearman"], abs=1e-12)
  assert cond.spearman(jax.device_get(m)) == pytest.approx(full["spearman"], abs=1e-12)
  # No mask = every token; float32 states (what a training eval step has).
  m32 = cond.condensation_metrics(tuple(x.astype(jnp.float32) for x in h))
  ref, _, _ = numpy_reference(states, [40, 40])
  np.testing.assert_allclose([float(m32[f"condensation/mean_cos/layer_{i}"]) for i in range(4)], ref, atol=1e-6)


@pytest.mark.parametrize("y", [[0.1, 0.3, 0.2, 0.5], [3.0, 2.0, 1.0], [1.0, 2.0, 2.0, 0.5, 2.0], [5, 1, 1, 7, 7, 2]])
def test_jit_spearman_matches_scipy_with_ties(y):
  want = scipy.stats.spearmanr(np.arange(len(y)), y).statistic
  assert float(jax.jit(cond.rank_correlation_jnp)(jnp.asarray(y, jnp.float64))) == pytest.approx(want, abs=1e-12)
  assert cond.spearman(y) == pytest.approx(want, abs=1e-12)
  assert np.isnan(cond.spearman([1.0, 1.0, 1.0]))


def test_histogram_bins_like_numpy_at_edges():
  edges = np.linspace(-1, 1, 11)
  vals = np.concatenate([edges, edges[1:-1] - 1e-15, edges[1:-1] + 1e-15, [-1.0, 1.0, 0.0, 0.3]])
  n = int(np.ceil(np.sqrt(len(vals))))
  vals = np.concatenate([vals, np.full(n * n - len(vals), 0.05)])  # fill a square "cosine matrix"
  got = cond.histogram_counts(jnp.asarray(vals.reshape(1, n, n)), jnp.ones((1, n), bool), 10)
  np.testing.assert_array_equal(np.asarray(got), np.histogram(vals, bins=edges)[0])


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def ids_file(golden, tmp_path_factory):
  ids, _ = golden
  padded = ids.copy()
  padded[0, 25:] = -1  # texts of different lengths: negative ids are trailing padding
  path = tmp_path_factory.mktemp("ids") / "ids.npy"
  np.save(path, padded)
  return str(path)


def test_cli_end_to_end_and_compare(ids_file, golden, tiny_dir, tmp_path):
  TINY = tiny_dir
  ids, states = golden
  a, b = tmp_path / "a", tmp_path / "b"
  main(["--hf-model", TINY, "--token-ids", ids_file, "--max-length", "64", "--out", str(a), "--batch-size", "2"])
  for f in ("condensation.json", "condensation_heatmap.png", "condensation_mean.png"):
    assert (a / f).stat().st_size > 0
  s = json.loads((a / "condensation.json").read_text())
  # float32 model here: the golden float64 values to float32 accuracy.
  mean, off, _ = numpy_reference(states, [25, 40])
  np.testing.assert_allclose(s["mean_cossim_by_layer"], mean, atol=1e-5)
  np.testing.assert_allclose(s["mean_cossim_by_layer_offdiag"], off, atol=1e-5)
  for k in ("histograms", "spearman", "kendall", "spearman_offdiag", "kendall_offdiag", "settings"):
    assert k in s
  assert s["settings"]["max_length"] == 64 and s["settings"]["num_bins"] == BINS
  main(
      [
          "--hf-model",
          TINY,
          "--token-ids",
          ids_file,
          "--max-length",
          "16",
          "--out",
          str(b),
          "--compare",
          str(a / "condensation.json"),
          "--labels",
          "short,long",
      ]
  )
  assert (b / "condensation_compare.png").stat().st_size > 0
  assert json.loads((b / "condensation.json").read_text())["num_tokens"] == 32


def _err(argv, match, capsys):
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code != 0
  if match:
    msg = capsys.readouterr().err.strip()
    assert match in msg and "\n" not in msg, msg


def test_cli_bad_inputs(ids_file, tiny_dir, tmp_path, capsys):
  TINY = tiny_dir
  out = ["--out", str(tmp_path / "o")]
  big = tmp_path / "big.npy"
  np.save(big, np.array([[1, 2, 512]]))
  _err(["--hf-model", TINY, "--token-ids", str(big), "--max-length", "8", *out], "outside the model vocabulary", capsys)
  gap = tmp_path / "gap.npy"
  np.save(gap, np.array([[1, -1, 3]]))
  _err(["--hf-model", TINY, "--token-ids", str(gap), "--max-length", "8", *out], "padding", capsys)
  flt = tmp_path / "flt.npy"
  np.save(flt, np.zeros((2, 3)))
  _err(["--hf-model", TINY, "--token-ids", str(flt), "--max-length", "8", *out], "integer array", capsys)
  texts = tmp_path / "t.txt"
  texts.write_text("Hello world, this is English.\n")  # GPT-2 BPE ids exceed the tiny model's vocab of 512
  _err(["--hf-model", TINY, "--texts", str(texts), "--max-length", "8", *out], "outside the model vocabulary", capsys)
  _err(["--hf-model", TINY, "--texts", str(tmp_path / "missing.txt"), "--max-length", "8", *out], "not found", capsys)
  _err(["--hf-model", str(tmp_path), "--token-ids", ids_file, "--max-length", "8", *out], "not found", capsys)
  _err(["--hf-model", TINY, "--token-ids", ids_file, "--max-length", "8", "--compare", str(big), *out], "", capsys)
  _err(
      ["--hf-model", TINY, "--token-ids", ids_file, "--max-length", "8", "--compare", str(texts), *out],
      "not JSON",
      capsys,
  )
  _err(["--hf-model", TINY, "--token-ids", ids_file, "--max-length", "8", "--labels", "a,b", *out], None, capsys)
  _err(["--hf-model", TINY, "--token-ids", ids_file, "--texts", str(texts), "--max-length", "8", *out], None, capsys)
  _err(["--hf-model", TINY, "--corpus", "default", "--max-length", "8", *out], None, capsys)
  _err(["--token-ids", ids_file, "--max-length", "8", *out], None, capsys)


def test_cli_workdir(tmp_path, make_run, capsys):
  model_cfg, params = make_run(tmp_path / "run", 3)  # preset "test": vocab 128, n_positions 32, 2 layers
  ids = np.random.default_rng(0).integers(0, 128, (3, 40))
  np.save(tmp_path / "ids.npy", ids)
  out = tmp_path / "out"
  main(
      [
          "--workdir",
          str(tmp_path / "run"),
          "--step",
          "3",
          "--token-ids",
          str(tmp_path / "ids.npy"),
          "--max-length",
          "64",
          "--out",
          str(out),
      ]
  )
  s = json.loads((out / "condensation.json").read_text())
  want = cond.model_statistics(model_cfg, params, ids.tolist(), max_length=64)
  assert s["settings"]["max_length"] == 32 and s["num_tokens"] == 3 * 32  # capped at n_positions
  np.testing.assert_allclose(s["mean_cossim_by_layer"], want["mean_cossim_by_layer"], atol=1e-6)
  assert len(s["mean_cossim_by_layer"]) == model_cfg.n_layer + 1
  _err(
      [
          "--workdir",
          str(tmp_path / "run"),
          "--step",
          "9",
          "--token-ids",
          str(tmp_path / "ids.npy"),
          "--max-length",
          "8",
          "--out",
          str(out),
      ],
      "no checkpoint",
      capsys,
  )
