#!/usr/bin/env bash
# The GPU check of a session lent the one-GPU machine, in one call (well under 8 minutes):
#   1. installs the wheels carried in .whl/ (scripts/gpu_wheels.sh fetched them);
#   2. runs the CUDA tests that fit one GPU (tests/test_cuda_parity.py, marker `cuda`);
#   3. measures train / inference / generation of a 0.5B llama in bf16 beside transformers on the
#      same GPU (tokens/s, MFU against the measured 790 TFLOP/s bf16 peak, peak memory).
# Everything it reports lands in $OUT (gpu_check.json, the test log, nvidia-smi).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 LIGHTNING_REAL_BACKEND=nccl
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, megatron.core, lightning_real; print('torch', torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/versions.txt"
start=$(date +%s)
timeout 200 python3 -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda_parity.py 2>&1 | tail -40 > "$OUT/cuda_tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 220 python3 benchmarks/engine.py --only speed --model 0.5b --precision bf16-mixed --worlds 1 --rounds 1 \
  --reps 3 --peak-tflops 790 --json "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
bench_rc=$?
python3 - "$OUT" "$tests_rc" "$bench_rc" "$start" <<'PY'
import json, sys, time
from pathlib import Path
out, tests_rc, bench_rc, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
engine = json.loads((out / "engine.json").read_text()) if (out / "engine.json").is_file() else None
summary = {
    "cuda_tests_rc": tests_rc,
    "cuda_tests_tail": (out / "cuda_tests.txt").read_text().splitlines()[-3:],
    "engine_rc": bench_rc,
    "engine": engine,
    "seconds": round(time.time() - start, 1),
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps({k: v for k, v in summary.items() if k != "engine"}, indent=2))
PY
cat "$OUT/engine.txt" | grep "^|" || true
