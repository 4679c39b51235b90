"""The torch half of research/bench_harness.py: times the harness's own `HFLM.loglikelihood` on the same model
directory and requests. Runs in a separate Python with torch, transformers and lm_eval (it imports nothing of this
package, whose JAX it may lack): `PYTHON bench_hflm_worker.py < job.json > result.json`, job =
{"model_dir", "requests": [[context, continuation], ...], "batch_size", "repeats", "threads"}."""

import json
import sys
import time


def main() -> None:
  job = json.load(sys.stdin)
  import torch
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM

  if job.get("threads"):
    torch.set_num_threads(job["threads"])
  lm = HFLM(pretrained=job["model_dir"], batch_size=job["batch_size"], dtype="float32", device="cpu")
  reqs = [Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(job["requests"])]
  seconds, out = [], None
  for _ in range(job["repeats"] + 1):  # the first round warms up (allocations, thread pools)
    start = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    seconds.append(time.perf_counter() - start)
  json.dump({"seconds": seconds, "logliks": [float(ll) for ll, _ in out], "torch": torch.__version__}, sys.stdout)


if __name__ == "__main__":
  main()
