#!/usr/bin/env bash
# Every GPU check the open issues need (#10 decode speed, kernels, prefill overhead and compiled decode, #12
# CritiPrefill speed), as stages that fit the device's calls (10 minutes each, 30 device minutes a session, a cold
# start ~1 minute of it), so that a session lent a GPU spends its minutes measuring, not setting up. Seen on an H100
# (2026-11-25, benchmarks/results/gpu_h100_2026-11-25/): `speed critiprefill` together take ~2.5 minutes; `tests`
# and `e2e` each need a call of their own (compiling the 8B model's decode step with a cold inductor cache takes
# minutes per configuration); `prefill` ~3-5 minutes.
#
# Usage (the repository root is the working directory; the device tool's run takes it as its command):
#   bash benchmarks/gpu_suite.sh STAGE...   # several stages run in order, in one call
#   tests         environment report + the kernel tests compiled on CUDA (fp32/fp16/bf16) + generate on CUDA
#   speed         benchmarks/gpu_speed.py: decode attention alone (ragged vs sdpa, fused vs unfused, flash)
#   prefill       decode_profile.py + prefill_overhead.py on CUDA, 32k tokens
#   critiprefill  critiprefill_speed.py
#   e2e           adakv-bench speed on the Llama-3.1-8B shape: DynamicCache, compiled StaticCache, compiled adakv
# with `carry: [".whl", ".gpu"]`: .whl holds the transformers this checkout tests where the device's is older
# (here: echo /.whl/ >> .git/info/exclude; pip download --no-deps --only-binary=:all: --python-version 3.12
#  --implementation cp --platform manylinux2014_x86_64 -d .whl transformers==<`pip show transformers`>), and
# .gpu/llama8b-shape (for e2e) Llama-3.1-8B's config.json with any tokenizer's files (SmolLM2's: random ids).
# Give the commit you run as ADAKV_COMMIT=<sha> before the command (the device's copy of the tree has no git
# history, and adakv is installed into a folder of its own). Outputs go to $OUT: one log per call and one .tar.gz per
# stage, packed again after each step so that a step cut off by the call's limit keeps the earlier ones' results
# (the device returns at most 8 files). Unpack them into benchmarks/results/ and commit them with the device name.
# Locally, `OUT=/tmp/x bash benchmarks/gpu_suite.sh env` checks the setup.
set -uo pipefail
stages=("$@")
[ ${#stages[@]} -gt 0 ] || { echo "give stages: env tests speed prefill critiprefill e2e (several run in order)"; exit 2; }
for stage in "${stages[@]}"; do
    case $stage in
    env | tests | speed | prefill | critiprefill | e2e) ;;
    *) echo "unknown stage $stage: env, tests, speed, prefill, critiprefill or e2e"; exit 2 ;;
    esac
done
OUT=${OUT:?OUT must name the output folder}
mkdir -p "$OUT"
exec > >(tee "$OUT/$(IFS=_; echo "${stages[*]}").log") 2>&1
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

run_step() {  # run_step SECONDS NAME COMMAND...: one step with its own limit, its status logged, results packed
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$results/$name.txt"  # a pipe: tee is done before the tar
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
    # packed after every step: a later step that runs past the device's limit cannot take this one's output with it
    tar -czf "$OUT/$stage.tar.gz" -C "$results" .
}

for stage in "${stages[@]}"; do
results="$work/results/$stage"
mkdir -p "$results"
case $stage in
env)
    env_report
    ;;
tests)
    env_report | tee "$results/env.txt"
    # TRITON_INTERPRET=0: the kernels run compiled on the GPU, in every dtype the tests draw (the interpreter's
    # half-precision dots are what CI cannot check).
    # -v into the results as it runs: junit's XML is written only at the end, which a limit can cut off
    # -n 8: compiling the kernels for every drawn shape and dtype is CPU work (pytest-xdist is in the device image)
    run_step 280 kernel-tests env TRITON_INTERPRET=0 $py -P -m pytest -v -n 8 -p no:cacheprovider --timeout 60 \
        --durations=15 --junitxml="$results/kernel_tests.xml" -o console_output_style=classic \
        tests/test_triton_decode.py tests/test_triton_kernels.py tests/test_critiprefill.py \
        tests/test_kernels_reference.py tests/test_torch_ragged.py tests/test_storage.py
    # the tiny models on the GPU: generate's compiled decode step (inductor, CUDA graphs) against eager, flash
    run_step 150 compiled-generate env ADAKV_TEST_DEVICE=cuda $py -P -m pytest -q -p no:cacheprovider \
        --timeout 140 --junitxml="$results/compiled_generate.xml" tests/test_static_decode.py tests/test_flash_backend.py
    ;;
speed)  # decode attention alone: ragged Triton vs sdpa over the full cache, fused vs unfused step, flash vs Triton
    run_step 200 gpu_speed $py benchmarks/gpu_speed.py --skip-e2e --repeats 10 --calls 50 \
        --out "$results/gpu_speed.json"
    ;;
prefill)
    run_step 200 decode_profile $py benchmarks/decode_profile.py --device cuda --model llama3-8b-shape \
        --dtype bfloat16 --length 32768 --steps 32 --out "$results/decode_profile"
    # issue #10 section 6: compression's share of a 32k prefill (goal <= 5% for ada-snapkv), CUDA syncs counted
    run_step 110 prefill_overhead $py benchmarks/prefill_overhead.py --device cuda --model llama3-8b-shape \
        --dtype bfloat16 --lengths 32768 --methods ada-snapkv defensivekv --out "$results/prefill_overhead"
    ;;
critiprefill)
    run_step 270 critiprefill_speed $py benchmarks/critiprefill_speed.py --repeats 3 --calls 5 --e2e-repeats 2 \
        --e2e-calls 1 --out "$results/critiprefill_gpu.json"
    ;;
e2e)  # issue #10 section 3: generate's decode, AdaKVCache vs DynamicCache and a compiled StaticCache, alternated
    # (needs .gpu/llama8b-shape: Llama-3.1-8B's config.json and any tokenizer, carried)
    for point in "4096 1" "32768 1 8"; do
        set -- $point
        run_step 290 "e2e-$1" $py -P -c 'import sys; from adakv.eval.cli import main; sys.exit(main())' speed --model .gpu/llama8b-shape --random-weights \
            --device cuda --dtype bfloat16 --methods ada-snapkv --budgets 0.2 --lengths "$1" --batches "${@:2}" \
            --static --compile --decode-steps 256 --repeats 2 --no-plots --out "$results/speed_$1"
    done
    ;;
esac
done
echo "results: $OUT/*.tar.gz"
