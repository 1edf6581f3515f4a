"""Compile every Triton kernel adakv launches for a Hopper GPU (sm_90), ahead of time, on a machine with no GPU.

Run as a script (``tests/test_kernels_compile_for_gpu.py`` does, in a subprocess without ``TRITON_INTERPRET``, so that
the kernels are JIT functions and the wrappers pick their GPU tile sizes). Each wrapper is called on small CPU tensors
with the launch intercepted: the arguments it would pass are recorded instead, and each recorded launch is compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (the wheel's own ptxas; no driver needed) twice: with the
float arguments typed fp32, as Triton's launcher passes them, and fp64, as inductor passes a Python float to a
user-defined kernel (torch 2.11 on an H100: the softmax scale turned the online softmax fp64, a compile error the
interpreter cannot show). Prints one JSON object: ``{"launches": [{"kernel", "config", "scalars", "error"}, ...]}``.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the probe compiles the JIT kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from adakv.kernels import triton_attention, triton_block_sparse, triton_copy, triton_decode  # noqa: E402

TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
}
recorded: list[tuple[JITFunction, dict, dict]] = []


def record(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: keeps the launch's arguments by name, launches nothing."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    recorded.append((self, bound, options))


def signature(fn: JITFunction, bound: dict, float_type: str) -> tuple[dict, dict]:
    sig, const = {}, {}
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr:
            sig[param.name] = "constexpr"
            const[param.name] = value
        elif isinstance(value, torch.Tensor):
            sig[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[param.name] = "i1"
        elif isinstance(value, int):
            sig[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[param.name] = float_type
        else:
            raise TypeError(f"{fn.__name__}: no type for argument {param.name}={value!r}")
    return sig, const


def ragged(dtype: torch.dtype, lengths: list[int], dim: int, slack: int = 4):
    length = torch.tensor(lengths, dtype=torch.int64).reshape(1, -1)
    start = torch.cumsum(length.reshape(-1) + slack, 0).reshape(1, -1) - (length + slack)
    rows = int((length + slack).sum())
    return torch.zeros(rows, dim, dtype=dtype), torch.zeros(rows, dim, dtype=dtype), start, length


# (dtype, head_dim) pairs compiled: every dtype, and each tile-size branch of the wrappers (head_dim <= 64, <= 128,
# 256); float arguments typed fp64 (inductor) everywhere, fp32 (Triton's launcher) for the first pair only
CASES = ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128), (torch.bfloat16, 256))


def launches(dtype: torch.dtype, dim: int) -> None:
    """Every wrapper's launches: short (one split) and long (split, merged) segments, softcap, hidden rows (padded
    multi-token appends), a decode step of one launch, compaction, appends, re-layout, block-sparse prefill."""
    k_buf, v_buf, start, length = ragged(dtype, [5, 3000], dim)
    heads = length.shape[1]
    for q_len, softcap, hidden in ((1, None, None), (3, 30.0, torch.zeros(1, 3, dtype=torch.int64))):
        q = torch.zeros(1, heads, 4, q_len, dim, dtype=dtype)
        triton_attention.ragged_attention(q, k_buf, v_buf, start, length, 0.1, softcap, hidden, 3000)
        triton_attention.ragged_attention(q, k_buf, v_buf, start, length, 0.1, softcap, hidden, 8)  # one split
    q = torch.zeros(1, heads, 4, 1, dim, dtype=dtype)
    new = torch.zeros(1, heads, 1, dim, dtype=dtype)
    counters = torch.zeros(heads, dtype=torch.int32)
    for softcap, width in ((None, 3001), (50.0, 9)):
        triton_decode._launch(q, new, new, k_buf, v_buf, start, length, counters, 0.1, softcap, width)
    rows = torch.zeros(1, heads, 3, dim, dtype=dtype)
    triton_copy.append_(k_buf, v_buf, rows, rows, start, length)
    triton_copy.append_(k_buf, v_buf, rows, rows, start, length, torch.ones(1, 3, dtype=torch.bool))
    keys = torch.zeros(1, heads, 40, dim, dtype=dtype)
    triton_copy.compact_(k_buf, v_buf, keys, keys, torch.zeros(1, heads, 40, dtype=torch.bool), start)
    triton_copy.copy_segments_(k_buf, v_buf, k_buf, v_buf, start, start, length)
    for q_len, softcap in ((600, None), (300, 20.0)):  # a full prompt, and a chunk after a prefix with softcap
        seg, blk = 64, 16
        geo = triton_block_sparse.geometry(q_len, 600, seg, blk)
        blocks = torch.zeros(1, 2, geo.n_seg, 4, dtype=torch.int32)
        dense = torch.zeros(1, 2, geo.n_seg, dtype=torch.bool)
        valid = torch.ones(1, 600, dtype=torch.bool)
        qq, kk = torch.zeros(1, 4, q_len, dim, dtype=dtype), torch.zeros(1, 2, 600, dim, dtype=dtype)
        triton_block_sparse.block_sparse_attention(qq, kk, kk, blocks, dense, valid, 0.1, softcap, seg, blk)


def main() -> None:
    JITFunction.run = record
    cases = []
    for i, (dtype, dim) in enumerate(CASES):
        first = len(recorded)
        launches(dtype, dim)
        cases += [("fp64", "fp32") if i == 0 else ("fp64",)] * (len(recorded) - first)
    seen, results = set(), []
    target = GPUTarget("cuda", 90, 32)
    for (fn, bound, options), float_types in zip(recorded, cases):
        for float_type in float_types:
            sig, const = signature(fn, bound, float_type)
            key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())), tuple(options.items()))
            if key in seen:
                continue
            seen.add(key)
            error = None
            try:
                triton.compile(ASTSource(fn, sig, const), target=target, options=options)
            except Exception as exc:  # noqa: BLE001  (reported, the test fails on it)
                error = f"{type(exc).__name__}: {str(exc)[-800:]}"
            config = const | {k: sig[k] for k in ("q_ptr", "k_ptr") if k in sig}
            results.append({"kernel": fn.__name__, "config": str(config), "scalars": float_type, "error": error})
    print(json.dumps({"launches": results}))


if __name__ == "__main__":
    main()
