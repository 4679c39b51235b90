"""Render the fit table (docs/accelerator-fit.md) from the dry runs of run_rows.sh.

python docs/accelerator-fit/table.py docs/accelerator-fit/rows.txt OUT_DIR  -> markdown rows on stdout.
"""

import json
import os
import re
import sys

GIB = 1024**3


def row(name: str, config: str, target: str, flags: str, out: str) -> str:
  log_path = os.path.join(out, f"{name}.log")
  command = (
      f"`python -m dispersion_jax train --config {config} --workdir /tmp/dry --config.dry_run=True "
      f"--config.dry_run_target={target} {flags}`"
  )
  if not os.path.exists(log_path):
    return f"| {name} | {target} | not run | | | | | {command} |"
  log = open(log_path).read()
  wall = re.search(r"exit (\d+) wall (\d+) s", log)
  path = os.path.join(out, name, "dry_run.json")
  if not os.path.exists(path):
    state = f"error (exit {wall.group(1)})" if wall else "not run (interrupted)"
    return f"| {name} | {target} | {state} | | | | {wall.group(2) if wall else ''} | {command} |"
  r = json.load(open(path))
  mesh = "x".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
  if r.get("compile_error"):
    need = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", r["compile_error"])
    memory = f"refused: {need.group(1)} G of temporaries > {need.group(2)} G" if need else r["compile_error"][:80]
    return f"| {name} | {target} ({mesh}) | **no** | {memory} | | | {wall.group(2)} | {command} |"
  total = r["memory_per_device"]["total"] / GIB
  cap = r["capacity_bytes"] / GIB
  bound = r["roofline"]["lower_bound_seconds"] * 1e3
  share = r["dispersion"]["share"] if r["dispersion"] else None
  disp = f"{share['flops']:+.1%} / {share['bytes accessed']:+.1%} / {share['temp']:+.1%}" if share else "(coeff 0)"
  fits = "yes" if r["fits"] else "**no**"
  if r["model"].get("attention_note"):  # XLA attention compiled in cuDNN's place: temp memory overestimated
    total_note = "*"
  else:
    total_note = ""
  return (
      f"| {name} | {target} ({mesh}) | {fits} | {total:.2f}{total_note} of {cap:.2f} | {bound:,.0f} ({r['roofline']['bound_by']}) | "
      f"{disp} | {wall.group(2)} | {command} |"
  )


def main(rows: str, out: str) -> None:
  print(
      "| row | target (data x fsdp x tensor) | fits | GiB per device | step >= ms (roofline bound) | dispersion share: FLOPs / bytes / temp | wall s (step + twin) | reproduce |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for line in open(rows):
    if line.strip() and not line.startswith("#"):
      name, config, target, *flags = line.split()
      print(row(name, config, target, " ".join(flags), out))


if __name__ == "__main__":
  main(*sys.argv[1:])
