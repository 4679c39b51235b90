"""One process of tests/test_harness_multiprocess.py: joins the run (JAX_* variables), loads the tiny HF model
argv[1] onto a mesh over every process's devices, and evaluates the tiny multiple-choice and generation tasks;
process 0 runs the harness and writes what simple_evaluate returns to argv[2], the others follow its calls."""

import json
import sys

from dispersion_jax.parallel import distributed

distributed.initialize()

import harness_helpers  # noqa: E402
import jax  # noqa: E402
import lm_eval  # noqa: E402

from dispersion_jax.data.tokenizer import get_tokenizer  # noqa: E402
from dispersion_jax.evaluation import evaluate as ev  # noqa: E402
from dispersion_jax.evaluation import harness, harness_tasks  # noqa: E402
from dispersion_jax.parallel import sharding

cfg, params, tok = ev.load_model(hf_model=sys.argv[1])
mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
lm = harness.JaxLM(cfg, params, get_tokenizer(tok), mesh=mesh, batch_size=4)
if lm.lead:
  tm = harness_tasks.task_manager(str(harness_helpers.TASKS), include_defaults=False)
  out = lm_eval.simple_evaluate(
      model=lm, tasks=["tiny_mc", "tiny_gen"], task_manager=tm, log_samples=True, bootstrap_iters=0
  )
  lm.close()
  with open(sys.argv[2], "w") as fh:
    json.dump(
        {t: [s["resps"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])] for t in out["samples"]}, fh
    )
else:
  lm.serve()
print(f"process {jax.process_index()} done", flush=True)
