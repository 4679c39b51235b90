"""Our memory per chip for issue 27's benchmark beside MaxText's, both COMPILER ESTIMATES (the TPU compiler's buffer
assignment for a v5e-8, compile-only from a CPU machine; nothing here ran on a TPU).

Benchmark: Qwen3-0.6B, global batch 32 (4 per chip) x 2048 tokens, fsdp over the 8 chips, no grad accumulation,
bf16 compute with float32 parameters and Adam, scanned layers, tied embeddings, full remat.

  python docs/accelerator-fit/maxtext_compare.py OUT_DIR [NAME ...]

compiles each named variant (default: all) with `python -m dispersion_jax train ... --config.dry_run=True` into
OUT_DIR/NAME (skipped where OUT_DIR/NAME/dry_run.json exists: minutes per compile on a small machine), then prints
the table and writes it as JSON to OUT_DIR/maxtext_compare.json. MaxText's numbers are quoted from issue 27 (MaxText
0.2.5 on jax 0.12.0 / libtpu 0.0.50.1: another compiler version than ours, jax 0.10.2 / libtpu 0.0.42.1).
"""

import json
import os
import subprocess
import sys

BENCH = [
    "--config", "configs/pretrain_qwen3.py", "--config.dry_run=True", "--config.dry_run_target=v5e-8",
    "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.preset=qwen3-0.6b", "--config.batch_size=32",
    "--config.seq_len=2048", "--config.grad_accum=1", "--config.model.remat=full", "--config.dry_run_twin=False",
]  # fmt: skip
OFF = ["--config.dispersion.coeff=0"]
ON = ["--config.dispersion.coeff=0.1", "--config.dispersion.loc=all"]  # angular_spread is the recipe's variant
# name -> (what it is, extra flags); "before" is the measurement: XLA attention, plain float32 logits.
VARIANTS = {
    "before": (
        "ours before issue 27 (XLA attention, [B, L, V] float32 logits)",
        [*OFF, "--config.model.attention=xla", "--config.ce_chunk=None"],
    ),
    "ours": ("ours: splash attention (auto on TPU), the recipe's fused CE", OFF),
    "ours-dispersion": ("ours, dispersion on (angular_spread, all layers, coeff 0.1)", ON),
    "ours-minimal": ("ours, model.remat=minimal", [*OFF, "--config.model.remat=minimal"]),
    "ours-dots": ("ours, model.remat=dots", [*OFF, "--config.model.remat=dots"]),
}
MAXTEXT = [  # issue 27: GiB per chip (temp), MaxText 0.2.5, jax 0.12.0, libtpu 0.0.50.1
    ("MaxText remat_policy=full (splash attention, its default)", 7.00, 6.13),
    ("MaxText remat_policy=full attention=dot_product", 7.30, 6.43),
    ("MaxText remat_policy=minimal (splash)", 16.23, None),
]
GIB = 2**30


def compile_variant(out: str, name: str) -> dict:
  path = os.path.join(out, name, "dry_run.json")
  if not os.path.exists(path):
    cmd = [sys.executable, "-m", "dispersion_jax", "train", *BENCH, *VARIANTS[name][1], f"--workdir={out}/{name}"]
    with open(os.path.join(out, f"{name}.log"), "w") as log:
      subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
  with open(path) as f:
    return json.load(f)


def main(argv: list[str]) -> None:
  if not argv or any(n not in VARIANTS for n in argv[1:]):
    sys.exit(f"error: usage: maxtext_compare.py OUT_DIR [{' '.join(VARIANTS)}]")
  out, names = argv[0], argv[1:] or list(VARIANTS)
  os.makedirs(out, exist_ok=True)
  rows = []
  for name in names:
    r = compile_variant(out, name)
    mem = r["memory_per_device"]
    rows.append(dict(
        row=VARIANTS[name][0], gib=mem["total"] / GIB, temp_gib=mem["temp"] / GIB, fits=r["fits"],
        attention=r["model"]["attention"], compiler="jax 0.10.2, libtpu 0.0.42.1",
        all_gather_mib=r["collectives"]["all-gather"]["bytes"] / 2**20,
    ))  # fmt: skip
  rows += [dict(row=n, gib=g, temp_gib=t, compiler="jax 0.12.0, libtpu 0.0.50.1 (quoted)") for n, g, t in MAXTEXT]
  print("v5e-8, Qwen3-0.6B, batch 32 x 2048, fsdp 8, full remat: GiB per chip, TPU COMPILER ESTIMATES (no TPU ran)")
  print(f"| {'row':<72} | GiB per chip | temp GiB | compiler |")
  print(f"|{'-' * 74}|--------------|----------|----------|")
  for r in rows:
    temp = "" if r["temp_gib"] is None else f"{r['temp_gib']:.2f}"
    print(f"| {r['row']:<72} | {r['gib']:12.2f} | {temp:>8} | {r['compiler']} |")
  with open(os.path.join(out, "maxtext_compare.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
