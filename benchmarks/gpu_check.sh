#!/usr/bin/env bash
# One GPU check: the suite on the GPU, the launch-shape sweep, the kernel table against the copy
# roofline, host syncs per step, and end-to-end sampling; every stage's files land in one folder
# as soon as the stage ends (so a run cut short still returns what it finished).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [WHEEL_DIR]     # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry [OUT_DIR]           # the same plumbing on a CPU (interpreter, tiny sizes)
#
# OUT_DIR defaults to $OUT (the device tool's folder) or ./gpu_check_out. WHEEL_DIR holds wheels
# for packages the GPU image lacks (diffusers and its missing requirements), installed offline
# with pip --no-index; default ../shared/gpu-wheels, else ./.whl. STAGES (environment) picks
# stages: env tests tests_rest kernels tune syncs throughput e2e1 e2e128 (default: all, in that order;
# tests_rest, the CPU-only rest of the suite, runs with TESTS=all).
# FASTDDPM_SOURCE_COMMIT names the commit that was sent, for the results' metadata (the copy of the
# tree on a lent machine may carry a stale .git); gpu_check.sh records it in env.txt too.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry" ]; then dry=1; shift; fi
out="${1:-${OUT:-gpu_check_out}}"
wheels="${2:-}"
if [ -z "$wheels" ]; then
  for candidate in ../shared/gpu-wheels .whl; do
    if [ -d "$candidate" ]; then wheels="$candidate"; break; fi
  done
fi
stages="${STAGES:-env tests tests_rest kernels tune syncs throughput e2e1 e2e128}"
mkdir -p "$out/files"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

pack() {  # every result so far in one archive, replaced atomically
  tar -czf "$out/.results.tgz.tmp" -C "$out" files && mv "$out/.results.tgz.tmp" "$out/results.tgz"
}

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/files/$name.txt" 2>&1
  local rc=$?
  tail -n 40 "$out/files/$name.txt" >> "$log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  pack
}

if [ -n "$wheels" ] && [ "$dry" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastddpm-site "$wheels"/*.whl \
    >> "$log" 2>&1 && export PYTHONPATH="/tmp/fastddpm-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import fastddpm.kernels" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$log" 2>&1
fi

if [ "$dry" = 1 ]; then
  stage env 60 python3 -c "import torch, triton, fastddpm; print(torch.__version__, triton.__version__, 'cpu dry run')"
  stage tune 300 python3 benchmarks/tune.py --dry --out "$out/files/tune.json"
  stage syncs 300 python3 benchmarks/sync_count.py --dry --out "$out/files/syncs.json"
  stage kernels 600 python3 benchmarks/run.py --device cpu --only kernels --sizes 64K --dtypes fp32 --out "$out/files/bench"
  stage throughput 300 python3 benchmarks/run.py --device cpu --only throughput --dry --out "$out/files/bench"
  echo "dry run done: $out" | tee -a "$log"
  exit 0
fi

stage env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, diffusers, fastddpm; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"diffusers\", diffusers.__version__, torch.cuda.get_device_name())"; echo "source commit: ${FASTDDPM_SOURCE_COMMIT:-unset}"; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head'
# The tests: the GPU-facing ones first (marked gpu_facing by tests/conftest.py), then, with
# TESTS=all, the rest (the CPU reference paths, as in CI). Every failure's traceback is printed as
# it happens (tests/print_failures.py), so a stage cut short by its limit still says why.
pytest_gpu=(python3 -m pytest -p xdist -n 16 -p print_failures --tb=short -q -o addopts="-ra")
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
stage tests "${TESTS_LIMIT:-240}" "${pytest_gpu[@]}" -m gpu_facing --junitxml="$out/files/junit.xml" tests
if [ "${TESTS:-gpu}" = all ]; then
  stage tests_rest "${TESTS_REST_LIMIT:-240}" "${pytest_gpu[@]}" -m "not gpu_facing" --junitxml="$out/files/junit-rest.xml" tests
fi
stage kernels 170 python3 benchmarks/run.py --only copy kernels --sizes 16M 64M --dtypes fp32 bf16 --out "$out/files/bench"
stage tune 60 python3 benchmarks/tune.py --sizes 64M --out "$out/files/tune.json"
stage syncs 60 python3 benchmarks/sync_count.py --out "$out/files/syncs.json"
# 50,000 samples with the 35.7M CIFAR-10 UNet (issue 22): rows are written as they finish
# (bench/<device>/*-throughput.partial.json), so a stage cut short keeps what it measured.
stage throughput "${THROUGHPUT_LIMIT:-420}" python3 benchmarks/run.py --only throughput --out "$out/files/bench"
stage e2e1 150 python3 benchmarks/run.py --only e2e --e2e-batches 1 --e2e-steps 1000 50 --tag b1 --out "$out/files/bench"
stage e2e128 90 python3 benchmarks/run.py --only e2e --e2e-batches 128 --e2e-steps 50 20 --e2e-suites b --tag b128 --out "$out/files/bench"
echo "done: $out" | tee -a "$log"
