#!/usr/bin/env bash
# The one prepared GPU check, for the day a GPU machine is lent (one H200 for a few minutes, nothing reachable
# but the copied working tree). Installs nothing: it runs the package from src/ with the machine's own python3,
# which must hold torch (faiss is not needed). Under 8 minutes on one H200:
#   1. the CUDA tests (training with bf16, fp16 + gradient scaler and fp32; embedding; the evaluator);
#   2. benchmarks/train_throughput.py --device cuda (images/s per setting, data-wait share);
#   3. benchmarks/eval_device.py: the evaluator on CUDA against the CPU at SOP scale (same metrics, time);
# and writes everything to one JSON, $OUT/gpu_check.json (OUT: the device tool's output folder, or argument 1).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/gpu_check}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started=$(date +%s)

"$PY" - > "$OUT/environment.json" <<'PYEOF'
import json, os, platform, subprocess, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if gpu else ""
print(json.dumps({"date": __import__("time").strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, "nvidia_smi": smi,
                  "cpus": os.cpu_count(), "bf16": torch.cuda.is_bf16_supported() if gpu else None}))
PYEOF
cat "$OUT/environment.json"

timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" \
    tests/integration/test_cuda.py "tests/unit/evaluation/test_retrieval.py::test_cuda_matches_cpu" \
    2>&1 | tee "$OUT/cuda_tests.log"
tests_status=${PIPESTATUS[0]}

timeout 240 "$PY" benchmarks/train_throughput.py --device cuda --workdir /tmp/normsoftmax-throughput \
    --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"

timeout 120 "$PY" benchmarks/eval_device.py --device cuda --json "$OUT/eval_device.json" 2>&1 | tee "$OUT/eval_device.log"

"$PY" - "$OUT" "$tests_status" "$started" <<'PYEOF'
import json, sys, time
from pathlib import Path
out, status, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as error:
        return {"error": str(error)}
tail = (out / "cuda_tests.log").read_text().strip().splitlines()[-1:] if (out / "cuda_tests.log").exists() else []
report = {"environment": load("environment.json"), "cuda_tests": {"exit_code": status, "summary": tail},
          "train_throughput": load("train_throughput.json"), "eval_device": load("eval_device.json"),
          "seconds": int(time.time()) - started}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu_check.json written ({report['seconds']} s)")
PYEOF
