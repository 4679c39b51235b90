"""The GPU check (launch/gpu_check.sh) and its report: verdicts against the targets come from measured rows only; a
benchmark point that cannot run (here: the Mosaic GPU kernel or cuDNN on a CPU) is a row with its error while the
other points are still timed; and the script itself runs end to end (at toy sizes), so a broken command in it fails
the suite although the suite never has a GPU."""

import json
import os
import subprocess
import sys

import pytest

from conftest import scaled
from dispersion_jax.benchmarks import gpu_report
from dispersion_jax.cli import bench
from dispersion_jax.cli import gpu_report as gpu_report_cli

TINY = ["--layers", "1", "--dim", "32", "--heads", "2", "--vocab", "128", "--seq", "8", "--batch", "2"]


def _row(framework="jax", impl="xla", coeff=0.1, tps=1.0, share=None, attention="cudnn", **kw):
  return dict(
      framework=framework,
      impl=impl if coeff else None,
      coeff=coeff,
      tokens_per_s=tps,
      dispersion_overhead=share,
      attention=attention,
      step_ms=1.0,
      mfu=0.4,
      device="NVIDIA H100",
      **kw,
  )


def test_verdicts_follow_the_measured_rows():
  runs = {
      "bench_train_gpt2": [
          _row(coeff=0.0, tps=700_000, share=0.0),
          _row(impl="xla", tps=640_000, share=0.086),
          _row(impl="pallas", tps=680_000, share=0.029),
          _row(impl="reference", tps=520_000, share=0.257),
          _row(framework="torch-eager", impl=None, tps=200_000, share=0.2),
      ],
      "bench_train_355m": [_row(coeff=0.0, tps=260_000), _row(impl="xla", tps=240_000)],
      "bench_attention": [
          _row(coeff=0.0, tps=700_000, attention="cudnn"),
          _row(coeff=0.0, tps=560_000, attention="xla"),
      ],
      "bench_dispersion": {
          "rows": [
              dict(variant="angular_spread", impl="xla", median_ms=0.5),
              dict(variant="angular_spread", impl="xla", median_ms=0.4),
              dict(variant="angular_spread", impl="pallas", median_ms=0.2),
          ]
      },
  }
  text = gpu_report.report(runs)
  assert "## GPU check: NVIDIA H100" in text
  assert ">= 600,000 tokens/s: met (680,000, impl pallas)" in text  # the fastest impl with dispersion
  assert "of that step: met (2.9%)" in text
  assert "GPT-2 355M >= 250,000 tokens/s: not met (240,000, impl xla)" in text
  assert "bench_train_gpt2: pallas / xla whole step = 1.062" in text
  assert "bench_train_qwen3: pallas / xla whole step = not measured" in text
  assert "angular_spread (value+grad, best block/tile): pallas 0.200 ms, xla 0.400 ms" in text
  assert "cuDNN / XLA attention, without dispersion: 1.250" in text
  assert "cuDNN / XLA attention, with dispersion: not measured" in text
  assert "PyTorch torch-eager, with dispersion: 3.40x" in text
  assert "Qwen3 width_256, seq 1024, batch 16, bf16\n\nnot run" in text


def test_a_failing_point_is_a_row_and_the_report_says_so(tmp_path):
  out = tmp_path / "bench_train_gpt2.json"
  bench.main(TINY + ["--repeats", "1", "--config.dispersion.impl=xla,pallas", "--json", str(out)])
  rows = json.loads(out.read_text())
  by_impl = {r["impl"]: r for r in rows}
  assert set(by_impl) == {None, "xla", "pallas"}
  assert by_impl["xla"]["tokens_per_s"] > 0 and "dispersion_overhead" in by_impl["xla"]
  assert "needs a CUDA GPU" in by_impl["pallas"]["error"] and "tokens_per_s" not in by_impl["pallas"]
  args = gpu_report_cli.parser().parse_args([str(tmp_path), "--json", str(tmp_path / "merged.json")])
  text = gpu_report_cli.run(args)
  assert "| pallas | failed: ValueError: impl='pallas' needs a CUDA GPU" in text
  assert "GPT-2 355M >= 250,000 tokens/s: not measured" in text
  assert json.loads((tmp_path / "merged.json").read_text())["bench_train_gpt2"] == rows


@pytest.mark.slow
def test_the_gpu_check_script_runs_end_to_end_at_toy_sizes(tmp_path):
  """TIMEOUT_SCALE=0: no step timeouts and no deadline inside the script (they are for a device call's 600 s, and
  a busy machine ran past them); this test's own timeout bounds the whole check, a hang guard (conftest.scaled)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHON=sys.executable, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"), TIMEOUT_SCALE="0")
  out = tmp_path / "out"
  proc = subprocess.run(
      ["bash", os.path.join(repo, "launch", "gpu_check.sh"), "--smoke", "--skip_tests", "--out", str(out)],
      env=env,
      capture_output=True,
      text=True,
      timeout=scaled(900),
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["bench.json", "env.txt", "report.md", "steps.log", "summary.txt"]
  runs = json.loads((out / "bench.json").read_text())
  assert sorted(runs) == [
      "bench_attention",
      "bench_dispersion",
      "bench_train_355m",
      "bench_train_gpt2",
      "bench_train_qwen3",
  ]
  measured = [r for r in runs["bench_train_gpt2"] if "tokens_per_s" in r]
  assert {r["impl"] for r in measured} == {None, "reference", "xla"}  # pallas: a row with its error on a CPU
  assert {r["family"] for r in runs["bench_train_qwen3"]} == {"qwen3"}
  assert all(r.get("median_ms") for r in runs["bench_dispersion"]["rows"])
  summary = (out / "summary.txt").read_text()
  for step in ("bench_train_gpt2", "bench_dispersion", "bench_attention", "bench_train_355m", "bench_train_qwen3"):
    assert f"{step} rc=0" in summary
  assert "## GPU check: cpu" in (out / "report.md").read_text()
  assert "=== bench_train_qwen3 (timeout 0s; 0 = none)" in (out / "steps.log").read_text()
