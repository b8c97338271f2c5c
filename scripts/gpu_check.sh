#!/usr/bin/env bash
# A prepared check of the CUDA paths, a few minutes on one GPU. Sections (GPU_CHECK_SECTIONS, default all):
#   base       dtype auto, bitsandbytes 8/4-bit on CUDA, eager/sdpa/flash2 attention, random-weight
#              Qwen2.5-0.5B, CUDA memory figures, torch.compile with a static cache, continuous batching, vLLM
#              (where HARNESS_VLLM_PYTHON names its environment), NVML energy (joules per token over an idle
#              baseline, telemetry), a model split over GPUs (transformers tensor parallel, device_map; with one
#              GPU, their refusal), and the gpu-marked tests;
#   workflows  bench=quality (token NLL in bf16 and under bitsandbytes), bench=e2e, and the server, workflow and
#              e2e tests on CUDA (server: fastapi, uvicorn, openai; workflows: rank-bm25, markdown-it-py).
# Needs torch with CUDA, transformers, accelerate, hydra-core, bitsandbytes, psutil (pytest for the tests).
# Results land in ${GPU_CHECK_OUT:-outputs/gpu_check}; a table of what each point resolved to is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${GPU_CHECK_OUT:-outputs/gpu_check}"
mkdir -p "$out"
export HARNESS_CACHE_DIR="${HARNESS_CACHE_DIR:-$out/cache}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
sections="${GPU_CHECK_SECTIONS:-base workflows}"

python - <<'PY' || status=1
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported())
else:
    print("no CUDA device: the points below run on the CPU and the gpu tests skip")
PY

run() {  # run NAME ARGS...: one sweep under $out/NAME
  local name=$1; shift
  echo "== $name: $*"
  python -m harness -m "$@" hydra.sweep.dir="$out/$name" hydra.sweep.subdir='${hydra.job.num}' print_text=false \
    2>&1 | grep -E '^\[|points ok|Error' || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

if [[ " $sections " == *" base "* ]]; then
  run dtype_auto model=tiny-llama,tiny-qwen2,tiny-gpt2
  run bnb model=tiny-llama quant=8bit,4bit quant.compute_dtype=auto
  run attention model=tiny-llama attention=eager,sdpa,flash2
  run qwen05b model=qwen model.random_weights=true quant=none,8bit,4bit bench.max_new_tokens=64 \
      bench.prompt="Write a long story about a lighthouse keeper."
  run measure model=qwen model.random_weights=true quant=none,4bit bench=latency,memory,throughput \
      bench.min_seconds=1 bench.max_runs=15
  run compile model=qwen model.random_weights=true bench=latency engine.cache=static engine.compile=true \
      bench.min_seconds=1 bench.max_runs=15
  run batching model=qwen model.random_weights=true bench=throughput engine.batching=continuous \
      'bench.concurrency=[1,8]' 'bench.batch_sizes=[1]'
  if [ -n "${HARNESS_VLLM_PYTHON:-}" ]; then  # vLLM's CUDA build in an environment of its own
    run vllm model=qwen model.random_weights=true engine=vllm bench=latency bench.min_seconds=1 bench.max_runs=15
  else
    echo "== vllm: skipped: HARNESS_VLLM_PYTHON names no vLLM environment (pip install vllm in a venv of its own)"
  fi
  # A model split over GPUs: transformers tensor parallel (a rank per GPU over NCCL) and device_map need 2 or more.
  gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$gpus" -ge 2 ]; then
    run split model=tiny-llama bench=quality,latency engine.tensor_parallel=1,2 bench.min_seconds=1 bench.max_runs=15
    run device_map model=qwen model.random_weights=true model.device_map=auto bench=latency bench.min_seconds=1 \
        bench.max_runs=15
  else
    echo "== split: $gpus GPU(s), and a split needs 2: the refusal, with the count"
    python -m harness model=tiny-llama bench=latency engine.tensor_parallel=2 2>&1 | grep -E "needs 2 GPUs" \
      || status=1
  fi
  # NVML's energy counter (nvidia-ml-py: carry its wheel if the image lacks it): energy=on refuses to run without it.
  run energy model=qwen model.random_weights=true bench=latency energy=on energy_idle_s=3 bench.min_seconds=2 \
      bench.max_runs=30

  echo "== pytest -m gpu"
  python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [[ " $sections " == *" workflows "* ]]; then
  run quality model=qwen model.random_weights=true quant=none,8bit,4bit bench=quality bench.ppl_chars=8000
  run e2e model=qwen model.random_weights=true bench=e2e workflow=search_qa,chat workflow.limit=3 \
      workflow.max_new_tokens=32
  echo "== pytest: server, e2e, workflows"
  python -m pytest -q tests/test_server.py tests/test_e2e.py tests/test_workflows.py -p no:cacheprovider 2>&1 | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

python - "$out" <<'PY'
import sys
from analysis import load_results
from runners.benches import headline
rows = load_results(sys.argv[1])
print(f"\n{'point':52s} {'status':7s} {'device':6s} {'dtype':9s} {'attention':18s} {'load s':>7s}  headline")
for r in rows:
    p, res, m = r["point"], r.get("resolved") or {}, r.get("metrics") or {}
    bench = r["config"]["bench"]["name"]
    label = f"{p['model']} quant={p['quant']} attn={p['attention']} {bench}"
    print(f"{label:52s} {r['status']:7s} {res.get('device', '-'):6s} {res.get('dtype', '-'):9s} "
          f"{(res.get('attention') or {}).get('used', '-'):18s} {(r.get('timings') or {}).get('load_s', 0):7.2f}  "
          f"{headline(bench, m)}")
    for key in ("mbu[prompt=128]", "load_cuda_peak_mib", "cuda_after_first_request_mib",
                "inference_growth_cuda_mib[prompt=128,batch=4]", "queue_wait_ms[clients=4]", "idle_power_w",
                "mean_power_w[phase=measure]", "joules_per_token[prompt=128]"):
        if key in m:
            print(f"{'':60s}{key} = {m[key]['mean']:.3f} {m[key]['unit']}")
    if r["status"] != "ok":
        print("   ", (r.get("error") or {}).get("message"))
PY
exit $status
