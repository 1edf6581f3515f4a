#!/usr/bin/env bash
# Every GPU check the open issues need (#10 decode speed, kernels and prefill overhead, #12 CritiPrefill speed), in
# four commands of under 10 minutes each, so that a session lent a GPU spends its 30 device minutes measuring, not setting up.
#
# Usage (the repository root is the working directory; the device tool's run takes each as its command):
#   bash benchmarks/gpu_suite.sh tests      # environment report + the kernel tests on CUDA (fp32/fp16/bf16)
#   bash benchmarks/gpu_suite.sh speed      # benchmarks/gpu_speed.py: decode attention and end to end
#   bash benchmarks/gpu_suite.sh prefill    # decode_profile.py + prefill_overhead.py on CUDA, 32k tokens
#   bash benchmarks/gpu_suite.sh critiprefill   # critiprefill_speed.py
# with `carry: [".whl"]` where the device's transformers is older than the one CI tests (prepare .whl here:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==<the version `pip show transformers` gives here>
# ). Give the commit you run as ADAKV_COMMIT=<sha> before the command (the device's copy of the tree may have no git
# history, and adakv is installed into a folder of its own, so the results would record no commit). Outputs go to $OUT (one log and one .tar.gz per stage: the device returns at most 8 files); unpack them
# into benchmarks/results/ and commit them with the device name. Each step has its own time limit so a slow one
# cannot take the others' output with it. Locally, `OUT=/tmp/x bash benchmarks/gpu_suite.sh env` checks the setup.
set -uo pipefail
stage=${1:?stage: env, tests, speed, prefill or critiprefill}
OUT=${OUT:?OUT must name the output folder}
mkdir -p "$OUT"
log="$OUT/$stage.log"
exec > >(tee "$log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
ADAKV_COMMIT=${ADAKV_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
export ADAKV_COMMIT
work=$(mktemp -d)
py=${PYTHON:-python3}

# adakv (and carried wheels) into a private target: the device image's own packages stay as they are.
site="$work/site"
if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
$py -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" . || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
results="$work/results"
mkdir -p "$results"

env_report() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
    $py -P - <<'EOF'
import importlib, inspect, platform, sys
import torch, transformers, adakv
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
print("transformers", transformers.__version__, "adakv", adakv.__file__)
for name in ("triton", "flash_attn", "flash_attn_interface"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except ImportError as err:
        print(name, "not importable:", err)
try:  # issue #10's flash backend would build on this (torch >= 2.10)
    from torch.nn.attention import varlen
    print("torch.nn.attention.varlen:", [n for n in dir(varlen) if not n.startswith("_")])
    print("varlen_attn", inspect.signature(varlen.varlen_attn))
except (ImportError, AttributeError) as err:
    print("torch.nn.attention.varlen: missing:", err)
EOF
}

run_step() {  # run_step SECONDS NAME COMMAND...: one step with its own limit, its status logged
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0))s"
}

case $stage in
env)
    env_report
    ;;
tests)
    env_report | tee "$results/env.txt"
    # TRITON_INTERPRET=0: the kernels run compiled on the GPU, in every dtype the tests draw (the interpreter's
    # half-precision dots are what CI cannot check).
    run_step 480 kernel-tests env TRITON_INTERPRET=0 $py -P -m pytest -q -p no:cacheprovider -x --timeout 300 \
        --junitxml="$results/kernel_tests.xml" tests/test_triton_decode.py tests/test_triton_kernels.py \
        tests/test_critiprefill.py tests/test_kernels_reference.py tests/test_torch_ragged.py \
        tests/test_static_decode.py tests/test_storage.py
    # the tiny models on the GPU: generate's compiled decode step (inductor, CUDA graphs) against eager, flash
    run_step 300 compiled-generate env ADAKV_TEST_DEVICE=cuda $py -P -m pytest -q -p no:cacheprovider -x \
        --timeout 280 --junitxml="$results/compiled_generate.xml" tests/test_static_decode.py tests/test_flash_backend.py
    ;;
speed)
    run_step 560 gpu_speed $py benchmarks/gpu_speed.py --out "$results/gpu_speed.json"
    ;;
prefill)
    run_step 200 decode_profile $py benchmarks/decode_profile.py --device cuda --model llama3-8b-shape \
        --dtype bfloat16 --length 32768 --steps 32 --out "$results/decode_profile"
    # issue #10 section 6: compression's share of a 32k prefill (goal <= 5% for ada-snapkv), CUDA syncs counted
    run_step 300 prefill_overhead $py benchmarks/prefill_overhead.py --device cuda --model llama3-8b-shape \
        --dtype bfloat16 --lengths 32768 --methods ada-snapkv defensivekv --out "$results/prefill_overhead"
    ;;
critiprefill)
    run_step 340 critiprefill_speed $py benchmarks/critiprefill_speed.py --out "$results/critiprefill_gpu.json"
    ;;
*)
    echo "unknown stage $stage: env, tests, speed, prefill or critiprefill"
    exit 2
    ;;
esac
tar -czf "$OUT/$stage.tar.gz" -C "$results" .
echo "results: $OUT/$stage.tar.gz"
