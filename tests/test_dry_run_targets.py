"""Dry runs for real accelerators from this CPU machine: Cloud TPU slice names, compile-only TPU / H100 devices
(the `compile` extra: libtpu, the CUDA PJRT plugin), the report and dry_run.json, and the not-fitting error.

Compiles use the tiny "test" presets (2 layers, width 32): seconds each. Tests that need a compiler skip without it.
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dispersion_jax import config as config_lib
from dispersion_jax.cli import train as train_cli
from dispersion_jax.compile import chips, dry_run_report, targets
from dispersion_jax.compile import dry_run as dry_run_lib
from dispersion_jax.errors import ConfigError
from dispersion_jax.parallel import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TPU_COMPILER = importlib.util.find_spec("libtpu") is not None
HAS_GPU_COMPILER = importlib.util.find_spec("jax_cuda12_plugin") is not None
needs_tpu = pytest.mark.skipif(not HAS_TPU_COMPILER, reason="libtpu absent: pip install -e '.[compile]'")
needs_gpu = pytest.mark.skipif(not HAS_GPU_COMPILER, reason="CUDA PJRT plugin absent: pip install -e '.[compile]'")

# Reference: MaxText src/maxtext/utils/accelerator_to_spec_map.py (AI-Hypercomputer/maxtext @ 19142c2): name ->
# (topology, chips, chip config, chips per host bounds, wrap), a sample of its table across every rule of ours.
MAXTEXT = {
    "v4-8": ("v4:2x2x1", 4, "megacore_dense", (2, 2, 1), (False, False, False)),
    "v4-128": ("v4:4x4x4", 64, "megacore_dense", (2, 2, 1), (True, True, True)),
    "v4-4096": ("v4:8x16x16", 2048, "megacore_dense", (2, 2, 1), (True, True, True)),
    "v5p-8": ("v5:2x2x1", 4, "megacore", (2, 2, 1), (False, False, False)),
    "v5p-64": ("v5:2x4x4", 32, "megacore", (2, 2, 1), (False, False, False)),
    "v5p-768": ("v5:4x8x12", 384, "megacore", (2, 2, 1), (True, True, True)),
    "v5p-2048": ("v5:8x8x16", 1024, "megacore", (2, 2, 1), (True, True, True)),
    "v5p-3584": ("v5:8x8x28", 1792, "megacore", (2, 2, 1), (True, True, True)),
    "v5p-4992": ("v5:4x12x52", 2496, "megacore", (2, 2, 1), (True, True, True)),
    "v5p-11264": ("v5:8x16x44", 5632, "megacore", (2, 2, 1), (True, True, True)),
    "v5p-17920": ("v5:16x20x28", 8960, "megacore", (2, 2, 1), (True, True, True)),
    "v5e-1": ("v5e:1x1", 1, "default", (1, 1, 1), (False, False, False)),
    "v5e-8": ("v5e:2x4", 8, "default", (2, 2, 1), (False, False, False)),
    "v5e-32": ("v5e:4x8", 32, "default", (2, 2, 1), (False, False, False)),
    "v5e-128": ("v5e:8x16", 128, "default", (2, 2, 1), (False, True, False)),
    "v6e-256": ("v6e:16x16", 256, "default", (2, 2, 1), (True, True, False)),
}


@pytest.mark.parametrize("name", sorted(MAXTEXT))
def test_cloud_tpu_names_match_maxtext(name):
  t = targets.parse(name)
  assert (t.topology, t.chips_per_slice, t.chip_config, t.host_bounds, t.wrap) == MAXTEXT[name]
  assert t.platform == "tpu" and t.num_devices == MAXTEXT[name][1]


def test_gpu_names_and_bad_names():
  t = targets.parse("h100-8x4")
  assert (t.platform, t.chip, t.topology, t.num_devices, t.slices) == ("gpu", "h100", "4x1x8", 32, 4)
  assert targets.parse("h200-8").num_devices == 8 and targets.parse("v5e-8", slices=2).num_devices == 16
  for bad, fix in (
      ("v5e-12", "1, 4, 8, 16"),
      ("v5p-4", "count TensorCores"),
      ("v5p-96", "multiple of 128"),
      ("h100-3", "1, 2, 4 or 8 GPUs"),
      ("a100-8", "v5e-8, v5p-8"),
  ):
    with pytest.raises(ConfigError, match=fix) as e:
      targets.parse(bad)
    assert "\n" not in str(e.value)


def test_roofline_and_share_arithmetic():
  chip = chips.CHIPS["v5e"]
  b = dry_run_report.roofline(197e12 * 0.002, 819e9 * 0.001, chip)  # 2 ms of compute, 1 ms of HBM traffic
  assert b["lower_bound_seconds"] == pytest.approx(0.002) and b["bound_by"] == "compute"
  assert "never a measurement" in b["note"]
  s = dry_run_report.share({"flops": 10.0, "temp": 4.0}, {"flops": 8.0, "temp": 4.0})
  assert s == {"flops": pytest.approx(0.2), "temp": 0.0}
  assert {c["chip"] for c in chips.table()} == {"v4", "v5e", "v5p", "v6e", "h100", "h200"}


def test_collectives_parser_on_hlo_text():
  text = """
  %all-gather.1 = bf16[128,512]{1,0:T(8,128)(2,1)} all-gather(%p), channel_id=1, dimensions={0}
  %all-reduce.2 = (f32[128]{0}, f32[]{:T(128)}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %ag-start = (f32[4,8]{1,0}, f32[32,8]{1,0}) all-gather-start(%x), channel_id=3
  %ag-done = f32[32,8]{1,0} all-gather-done(%ag-start)
  %cp-start = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(%y), channel_id=4
  ROOT %rs = f32[64]{0} reduce-scatter(%z), channel_id=5, dimensions={0}
  %fusion = f32[8]{0} fusion(%all-reduce.2), kind=kLoop
"""
  c = dry_run_report.collectives(text)
  assert c["all-gather"] == {"count": 2, "bytes": 128 * 512 * 2 + 32 * 8 * 4}
  assert c["all-reduce"] == {"count": 1, "bytes": 128 * 4 + 4}
  assert c["collective-permute"] == {"count": 1, "bytes": 16 * 4}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 64 * 4} and c["all-to-all"]["count"] == 0


def _target_mesh(name: str, slices: int = 1) -> Mesh:
  devices = targets.devices(targets.parse(name, slices))
  return Mesh(np.asarray(devices).reshape(-1), ("x",))


@pytest.mark.parametrize("name", [pytest.param("v5e-8", marks=needs_tpu), pytest.param("h100-8", marks=needs_gpu)])
def test_compiled_collectives_and_flops_are_exact(name):
  """A known program on 8 target devices: a row-sharded matmul (2 x 128 x 1024 x 1024 FLOPs per device) whose
  sum over rows is one all-reduce of a float32[1024] vector."""
  mesh = _target_mesh(name)
  x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  w = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=NamedSharding(mesh, P()))
  with backend.compiling_for(targets.parse(name).platform):
    compiled = jax.jit(lambda x, w: (x @ w).sum(0)).lower(x, w).compile()
  c = dry_run_report.collectives(compiled.as_text())
  assert c["all-reduce"] == {"count": 1, "bytes": 1024 * 4}
  assert sum(v["count"] for v in c.values()) == 1
  flops = dry_run_lib._cost(compiled)["flops"]
  assert 2 * 128 * 1024 * 1024 <= flops < 2 * 128 * 1024 * 1024 * 1.01


@needs_tpu
@needs_gpu
def test_multi_slice_and_multi_node_meshes_keep_fsdp_inside_a_slice():
  for name, slices, granule in (("v5e-8", 2, "slice_index"), ("h100-8x2", 1, "process_index")):
    cfg = config_lib.default_config()
    cfg.dry_run, cfg.dry_run_target, cfg.dry_run_slices = True, name, slices
    cfg.mesh.data, cfg.mesh.fsdp = 2, 8
    mesh = dry_run_lib.make_mesh(cfg, dry_run_lib.target_of(cfg))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
    for row in range(2):  # each data-parallel row is one slice / node: only DCN traffic is the gradient reduce
      assert {getattr(d, granule) for d in mesh.devices[row].reshape(-1)} == {row}


def _tiny(family: str, target: str, *overrides: str):
  shape = ["model.preset=test", "seq_len=32", "batch_size=8", "dispersion.loc=all"]
  if family == "qwen3":
    shape = ["model.family=qwen3", *shape]
  return config_lib.load(
      os.path.join(ROOT, "configs/gpt2_tiny.py"), [*shape, "dry_run=True", f"dry_run_target={target}", *overrides]
  )


REPORT_KEYS = {
    "target", "platform", "device_kind", "num_devices", "slices", "topology", "mesh", "batch_size", "seq_len",
    "grad_accum", "model", "compile_seconds", "memory_per_device", "memory_budget_gb", "capacity_bytes", "fits",
    "headroom_bytes", "headroom_fraction", "flops_per_device", "bytes_accessed_per_device", "cost_counting",
    "model_flops_per_device", "model_flops", "roofline", "collectives", "dispersion", "chips",
}  # fmt: skip


# The dispersion term on (and so the coeff-0 twin compiled) in one case, the GPU one (its FLOPs come through
# dry_run._cost's fallback): each compile takes seconds.
CASES = [
    pytest.param("gpt2", "v5e-8", ("mesh.data=4", "mesh.fsdp=2"), "TPU v5 lite", marks=needs_tpu),
    pytest.param("qwen3", "v5e-8", ("mesh.data=4", "mesh.fsdp=2"), "TPU v5 lite", marks=needs_tpu),
    pytest.param("gpt2", "v5p-8", (), "TPU v5", marks=needs_tpu),
    pytest.param("qwen3", "v5p-8", ("mesh.data=2", "mesh.fsdp=2"), "TPU v5", marks=needs_tpu),
    pytest.param("gpt2", "h100-8", (), "NVIDIA H100 80GB HBM3", marks=needs_gpu),
    pytest.param(
        "qwen3",
        "h100-8",
        ("mesh.data=4", "mesh.fsdp=2", "dispersion.coeff=0.1"),
        "NVIDIA H100 80GB HBM3",
        marks=needs_gpu,
    ),
]


@pytest.mark.parametrize("family, target, mesh, kind", CASES)
def test_tiny_models_compile_for_the_target(tmp_path, capsys, family, target, mesh, kind):
  cfg = _tiny(family, target, *mesh)
  config_lib.validate(cfg, dry_run_lib.num_devices(cfg))
  r = dry_run_lib.dry_run(cfg, str(tmp_path))
  n = targets.parse(target).num_devices
  assert (r["device_kind"], r["num_devices"], r["platform"]) == (kind, n, targets.parse(target).platform)
  assert r["model"]["dtype"] == "bfloat16"  # the target's default, not this CPU's float32
  assert r["mesh"]["data"] * r["mesh"]["fsdp"] == n and r["fits"] is True
  assert r["model"]["attention"] == ("cudnn" if kind.startswith("NVIDIA") else "xla")
  mem = r["memory_per_device"]
  assert mem["total"] == sum(v for k, v in mem.items() if k != "total") > 0
  assert r["headroom_bytes"] == chips.CHIPS[targets.parse(target).chip].hbm_bytes - mem["total"]
  # Float32 params + two Adam moments as the state's shardings place them: XLA's argument buffers hold that
  # (GPU: plus the batch and a few scalars; TPU layouts also pad small arrays to their tiles).
  param_bytes = sum(4 * math.prod(p.sharding.shard_shape(p.shape)) for p in _abstract_params(cfg))
  batch_bytes = 4 * 4 * cfg.batch_size * cfg.seq_len // (r["mesh"]["data"] * r["mesh"]["fsdp"])  # at most 4 int32
  most = 3 * param_bytes + batch_bytes + 64  # + step and rng; jit drops inputs a model does not read
  assert 3 * param_bytes <= mem["arguments"] <= (most if r["platform"] == "gpu" else 4 * most)
  assert r["flops_per_device"] > 0 and r["roofline"]["lower_bound_seconds"] > 0
  if cfg.dispersion.coeff:
    assert r["dispersion"]["share"]["flops"] > 0  # the term costs FLOPs: the step > its coeff-0 twin
  else:
    assert r["dispersion"] is None
  saved = json.loads((tmp_path / "dry_run.json").read_text())
  assert set(saved) == REPORT_KEYS and saved["memory_per_device"] == mem and saved["target"] == target
  assert set(saved["collectives"]) == set(dry_run_report.COLLECTIVES)
  assert "step time >= " in capsys.readouterr().out


def _abstract_params(cfg) -> list:
  """The parameters' shapes and shardings on the target (float32 whatever the compute dtype)."""
  from dispersion_jax.training import train

  model_cfg = config_lib.model_config(cfg)
  tx = train.step_function(cfg, model_cfg)[1]
  mesh = dry_run_lib.make_mesh(cfg, dry_run_lib.target_of(cfg))
  return jax.tree.leaves(dry_run_lib.abstract_inputs(cfg, model_cfg, tx, mesh)[0].params)


@needs_tpu
def test_too_large_for_the_slice_is_one_line_exit_2_after_the_report(tmp_path, capsys):
  """2 layers of width 8192 with GPT-2's vocabulary (2.0B params: 24 GB of float32 state and Adam moments),
  replicated over a v5e-4's data axis: more than a v5e chip's 16 GiB."""
  argv = [
      "--config", os.path.join(ROOT, "configs/gpt2_tiny.py"), f"--workdir={tmp_path}", "--config.dry_run=True",
      "--config.dry_run_target=v5e-4", "--config.mesh.data=4", "--config.batch_size=4", "--config.seq_len=32",
      "--config.model.n_layer=2", "--config.model.n_embd=8192", "--config.model.n_head=64",
      "--config.dispersion.coeff=0",
  ]  # fmt: skip
  with pytest.raises(SystemExit) as e:
    train_cli.main(argv)
  assert e.value.code == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("error: dry run: the v5e-4 compiler refused the step: "), err
  assert "Ran out of memory in memory space hbm" in err[0] or "Ran out of memory on HBM" in err[0]
  assert err[0].endswith(
      "; shard more (mesh.fsdp, mesh.tensor), set model.remat=full, or lower batch_size / raise grad_accum"
  )
  r = json.loads((tmp_path / "dry_run.json").read_text())
  assert r["fits"] is False and r["compile_error"] in err[0] and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}


def test_not_fitting_report_is_one_line_naming_the_fix():
  """The GPU compiler does not refuse an oversized step: the memory analysis against the chip's capacity does."""
  total = 90 * 2**30
  r = dict(
      target="h100-8", device_kind="NVIDIA H100 80GB HBM3", memory_per_device={"total": total}, memory_budget_gb=None
  )
  r |= dry_run_report.fit(total, chips.CHIPS["h100"])
  assert r["fits"] is False and r["headroom_bytes"] == chips.CHIPS["h100"].hbm_bytes - total
  assert str(dry_run_report.not_fitting_error(r)) == (
      "dry run: a h100-8 device (NVIDIA H100 80GB HBM3) needs 90.00 GiB > 79.11 GiB of HBM; shard more (mesh.fsdp, "
      "mesh.tensor), set model.remat=full, or lower batch_size / raise grad_accum"
  )
  r |= dry_run_report.fit(50 * 2**30, chips.CHIPS["h100"])
  assert r["fits"] and dry_run_report.not_fitting_error({**r, "memory_per_device": {"total": 50 * 2**30}}) is None


@needs_gpu
def test_bf16_step_with_the_pallas_kernel_compiles_for_an_h100(tmp_path):
  """The GPU benchmark's step (bf16, dispersion.impl=pallas, remat dots) compiled by the CUDA compiler to sm_90:
  the Mosaic GPU kernel is in the executable; the kernel needs a GPU only to run."""
  cfg = config_lib.load(
      os.path.join(ROOT, "configs/bench.py"),
      [
          "model.n_layer=2", "model.n_embd=128", "model.n_head=2", "model.vocab_size=512", "seq_len=200",
          "batch_size=2", "model.remat=dots", "dispersion.impl=pallas", "dispersion.block_size=None",
          "model.attention=xla",  # cuDNN's attention needs libcudnn to trace (dry_run.py falls back the same way)
          "dry_run=True", "dry_run_target=h100-1",
      ],
  )  # fmt: skip
  target = dry_run_lib.target_of(cfg)
  with backend.compiling_for("gpu"):
    compiled, _, _ = dry_run_lib.compile_train_step(cfg, dry_run_lib.make_mesh(cfg, target))
  text = compiled.as_text()
  assert "mosaic_gpu" in text and compiled.memory_analysis().temp_size_in_bytes > 0


def test_missing_compiler_is_one_line_naming_the_extra(monkeypatch):
  from jax.experimental import topologies

  def absent(**_):
    raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

  monkeypatch.setattr(topologies, "get_topology_desc", absent)
  with pytest.raises(ConfigError, match=r"^dry_run_target=v5p-8 needs libtpu: pip install -e '\.\[compile\]'"):
    targets.devices(targets.parse("v5p-8"))
