#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, from a fresh checkout, in under 8 minutes —
#   1. set-up (scripts/setup.sh where a package registry is reachable; on an offline GPU machine,
#      the machine's own python3 and torch with this checkout on PYTHONPATH: tests of packages it
#      lacks, e.g. Ray or MLflow, are skipped and the summary says which),
#   2. the `gpu` tests (tests/test_gpu.py: one-process runs, Ray Train with one GPU, CPU→GPU resume,
#      sample/inpaint/interpolate/evaluate on CUDA, bf16/compile/channels-last against the plain
#      path, a Langevin loop without host syncs),
#   3. benchmarks/langevin.py and benchmarks/training.py on CUDA, and benchmarks/preset_memory.py
#      (memory and speed per worker of the papers' presets),
# and writes OUT/SUMMARY.md with the figures (chain-steps/s, images/s, peak memory, bf16 and compile
# speed-ups against the fp32 eager path).
#
#   bash scripts/gpu_check.sh [OUT]        # OUT defaults to ./gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-check}")
mkdir -p "$out"
started=$(date +%s)
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_TELEMETRY=false

if python3 -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=5)" 2>/dev/null; then
    bash scripts/setup.sh 2>&1 | tail -3
    PY=.venv/bin/python
    setup="scripts/setup.sh (.venv)"
else
    PY=python3
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    if [ -d .whl ]; then  # optional pure-Python wheels carried to an offline machine
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/debm-site .whl/*.whl \
            && export PYTHONPATH=$PYTHONPATH:/tmp/debm-site
    fi
    setup="no registry reachable: $(command -v python3) with its own packages, checkout on PYTHONPATH"
fi
echo "[gpu-check] set-up: $setup"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
$PY - > "$out/versions.txt" 2>&1 <<'PY'
import importlib, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("ray", "mlflow", "webdataset", "torchmetrics", "skimage", "sklearn"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # missing on this host: its tests are skipped
        print(f"{name} missing ({type(err).__name__})")
PY
cat "$out/gpu.txt" "$out/versions.txt"

echo "[gpu-check] gpu tests"
DEBM_TEST_GPU=1 timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider -rs --timeout=120 tests/test_gpu.py \
    --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}

echo "[gpu-check] Langevin benchmark"
timeout 75 $PY benchmarks/langevin.py --device cuda --chains 256 --steps 50 --repeats 5 2>&1 | tee "$out/langevin.md" | tail -30
echo "[gpu-check] training benchmark"
timeout 100 $PY benchmarks/training.py --device cuda --rgb32 --iterations 40 --set model.channels=[64,128,256] \
    --set chains.bank_size=256 --set chains.batch_size=256 --set train.data_batch_size=256 \
    --json "$out/training.json" 2>&1 | grep -v "it/s" | tee "$out/training.md" | tail -12
echo "[gpu-check] presets for the papers' workloads: memory and speed per worker"
timeout 180 $PY benchmarks/preset_memory.py --device cuda --json "$out/preset_memory.json" 2>&1 \
    | tee "$out/preset_memory.md" | tail -10

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')"
    echo
    echo "- GPU: $(cat "$out/gpu.txt")"
    echo "- set-up: $setup"
    sed 's/^/- /' "$out/versions.txt"
    echo "- wall time: $(( $(date +%s) - started )) s"
    echo
    echo "## gpu tests (exit $tests_rc)"
    echo
    echo '```'
    grep -E "passed|failed|error|SKIPPED|FAILED|ERROR" "$out/gpu-tests.log" | tail -30
    echo '```'
    echo
    echo "## Langevin (benchmarks/langevin.py --device cuda --chains 256 --steps 50)"
    echo
    echo '```'
    grep -v -i -E "warn" "$out/langevin.md"
    echo '```'
    echo
    echo "## Training (benchmarks/training.py --device cuda --rgb32, 256 chains, channels 64-128-256)"
    echo
    grep -E "^\||^#" "$out/training.md"
    echo
    echo "## Presets for the papers' workloads (benchmarks/preset_memory.py --device cuda, one worker)"
    echo
    grep -E "^\||^#" "$out/preset_memory.md"
} > "$out/SUMMARY.md"
echo "[gpu-check] summary: $out/SUMMARY.md"
exit "$tests_rc"
