"""Compile an MLX custom Metal kernel body as C++ and run it on the CPU.

`run_kernel` takes the arguments of `mx.fast.metal_kernel(...)` and of its call, generates the
function MLX would generate around the body (mlx/fast.cpp, `write_signature`: template
parameters, `const device T* name [[buffer(i)]]` inputs, `const constant T&` for 0-d inputs,
`name_shape` / `name_strides` / `name_ndim` when the body uses them, `device T* out` outputs,
then the thread attributes the body mentions), and compiles it with g++ against
metal_compat.h. Threadgroups run one after the other; the threads of a group are real
threads (std::thread), so barriers and simd reductions synchronise as on the GPU, and
`threadgroup` storage (the body's declarations, made `static` by the wrapper) is shared by
exactly one group.
Grids follow MLX's dispatchThreads: `grid` counts threads, edge groups may be partial.

Binaries are cached by source hash under $TMPDIR/metal_harness; `mlx_launch` adapts the
runner to the `_launch` hook of backends/mlx/kernels.py (mx arrays in and out).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / "metal_harness"
CXXFLAGS = ["-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", "-Wno-attributes"]
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the constant address space

# Metal type names MLX writes for each dtype (get_type_string).
_TYPE = {
    np.dtype(np.float32): "float", np.dtype(np.float16): "float16_t",
    np.dtype(ml_dtypes.bfloat16): "bfloat16_t", np.dtype(np.int32): "int",
    np.dtype(np.uint32): "uint32_t", np.dtype(np.int64): "int64_t",
    np.dtype(np.uint64): "uint64_t", np.dtype(np.int16): "int16_t",
    np.dtype(np.uint16): "uint16_t", np.dtype(np.int8): "int8_t",
    np.dtype(np.uint8): "uint8_t", np.dtype(np.bool_): "bool",
}

# Thread attributes (MLX's list) -> their value in the launcher.
_ATTRS = {
    "dispatch_threads_per_threadgroup": ("uint3", "tgs"),
    "grid_origin": ("uint3", "uint3{0, 0, 0}"),
    "grid_size": ("uint3", "grid3"),
    "simdgroup_index_in_threadgroup": ("uint", "uint(tid / mh::SIMD_WIDTH)"),
    "simdgroups_per_threadgroup": ("uint", "uint((nthreads + mh::SIMD_WIDTH - 1) / mh::SIMD_WIDTH)"),
    "thread_execution_width": ("uint", "uint(mh::SIMD_WIDTH)"),
    "thread_index_in_simdgroup": ("uint", "uint(tid % mh::SIMD_WIDTH)"),
    "thread_index_in_threadgroup": ("uint", "uint(tid)"),
    "thread_position_in_grid": ("uint3", "tpg"),
    "thread_position_in_threadgroup": ("uint3", "tpt"),
    "threadgroup_position_in_grid": ("uint3", "gpos"),
    "threadgroups_per_grid": ("uint3", "ngroups"),
    "threads_per_grid": ("uint3", "grid3"),
    "threads_per_simdgroup": ("uint", "uint(mh::SIMD_WIDTH)"),
    "threads_per_threadgroup": ("uint3", "tsize"),
}
_UNSUPPORTED_ATTRS = ["dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
                      "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup",
                      "thread_index_in_quadgroup"]
_QUALIFIERS = ["device", "constant", "thread", "threadgroup"]


class HarnessError(RuntimeError):
    """The kernel could not be generated, compiled or launched."""


def _np_dtype(dt) -> np.dtype:
    """numpy dtype of a numpy or MLX dtype."""
    if not str(dt).startswith("mlx.core."):
        return np.dtype(dt)
    name = str(dt).removeprefix("mlx.core.")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _template_value(value) -> tuple[str, str]:
    """(C++ parameter kind, value text) as MLX's write_template writes them."""
    if isinstance(value, bool):
        return "bool", str(int(value))
    if isinstance(value, int):
        return "int", str(value)
    return "typename", _TYPE[_np_dtype(value)]


def generate(name, header, source, input_names, inputs, output_names, output_dtypes,
             template=(), atomic_outputs=False):
    """C++ text of the kernel as MLX wraps it, plus an extern "C" launcher `mh_launch`.

    Returns (text, arg_plan), arg_plan listing the launcher's arguments in buffer order:
    ("input", i), ("shape", i), ("strides", i), ("ndim", i), ("output", i).
    """
    if atomic_outputs:
        raise HarnessError("atomic outputs are not emulated")
    for attr in _UNSUPPORTED_ATTRS:
        if attr in source:
            raise HarnessError(f"thread attribute {attr} is not emulated")
    # Same detection as MLX: a substring search of the body.
    attrs = [a for a in sorted(_ATTRS) if a in source]
    shape_infos = [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
                   for n in input_names]
    tmpl = [(n, *_template_value(v)) for n, v in template]
    kname = "custom_kernel_" + name
    if tmpl:
        kname += "_" + "_".join(re.sub(r"\W", "_", v) for _, _, v in tmpl)

    params, plan = [], []
    for i, (n, x) in enumerate(zip(input_names, inputs)):
        loc = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if x.ndim == 0 else "*"
        params.append(f"  const {loc} {_TYPE[x.dtype]}{ref} {n} [[buffer({len(plan)})]]")
        plan.append(("input", i))
        if x.ndim > 0:
            for flag, kind, decl in zip(shape_infos[i], ("shape", "strides", "ndim"),
                                        ("const constant int* {}_shape", "const constant int64_t* {}_strides",
                                         "const constant int& {}_ndim")):
                if flag:
                    params.append(f"  {decl.format(n)} [[buffer({len(plan)})]]")
                    plan.append((kind, i))
    for i, (n, dt) in enumerate(zip(output_names, output_dtypes)):
        params.append(f"  device {_TYPE[_np_dtype(dt)]}* {n} [[buffer({len(plan)})]]")
        plan.append(("output", i))
    params += [f"  {_ATTRS[a][0]} {a} [[{a}]]" for a in attrs]

    lines = ['#include "metal_compat.h"']
    # Address spaces are empty, except that the body's `threadgroup` declarations become static:
    # one array shared by the threads of the group that runs (groups run one at a time), while
    # `threadgroup` in a pointer type (a header function's parameter) stays a plain pointer.
    lines += [f"#define {q}" for q in _QUALIFIERS]
    source = re.sub(r"^(\s*)threadgroup\b", r"\1static", source, flags=re.M)
    lines.append(header)
    if tmpl:
        lines.append("template <" + ", ".join(f"{kind} {n}" for n, kind, _ in tmpl) + ">")
    lines.append(f"[[kernel]] void {kname}(\n" + ",\n".join(params) + ") {")
    lines.append(source)
    lines.append("}")
    lines += [f"#undef {q}" for q in _QUALIFIERS]

    # Launcher: args[k] points at the data of buffer k.
    call_args = []
    for k, (kind, i) in enumerate(plan):
        if kind == "input":
            ctype = _TYPE[inputs[i].dtype]
            call_args.append(f"*(const {ctype}*)args[{k}]" if inputs[i].ndim == 0
                             else f"(const {ctype}*)args[{k}]")
        elif kind == "shape":
            call_args.append(f"(const int*)args[{k}]")
        elif kind == "strides":
            call_args.append(f"(const int64_t*)args[{k}]")
        elif kind == "ndim":
            call_args.append(f"*(const int*)args[{k}]")
        else:
            call_args.append(f"({_TYPE[_np_dtype(output_dtypes[i])]}*)args[{k}]")
    call_args += [_ATTRS[a][1] for a in attrs]
    targs = "<" + ", ".join(v for _, _, v in tmpl) + ">" if tmpl else ""
    lines.append(f"""
extern "C" void mh_launch(void** args, const unsigned* grid, const unsigned* tg) {{
  const uint3 grid3{{grid[0], grid[1], grid[2]}};
  const uint3 tgs{{std::min(tg[0], grid[0]), std::min(tg[1], grid[1]), std::min(tg[2], grid[2])}};
  const uint3 ngroups{{(grid[0] + tgs.x - 1) / tgs.x, (grid[1] + tgs.y - 1) / tgs.y,
                       (grid[2] + tgs.z - 1) / tgs.z}};
  for (uint gz = 0; gz < ngroups.z; ++gz)
  for (uint gy = 0; gy < ngroups.y; ++gy)
  for (uint gx = 0; gx < ngroups.x; ++gx) {{
    const uint3 gpos{{gx, gy, gz}};
    const uint3 tsize{{std::min(tgs.x, grid[0] - gx * tgs.x), std::min(tgs.y, grid[1] - gy * tgs.y),
                       std::min(tgs.z, grid[2] - gz * tgs.z)}};
    const int nthreads = int(tsize.x * tsize.y * tsize.z);
    mh::Group group(nthreads);
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (int tid = 0; tid < nthreads; ++tid) {{
      threads.emplace_back([&, tid] {{
        mh::self = mh::ThreadState{{&group, tid % mh::SIMD_WIDTH, tid / mh::SIMD_WIDTH, 0}};
        const uint3 tpt{{uint(tid) % tsize.x, (uint(tid) / tsize.x) % tsize.y, uint(tid) / (tsize.x * tsize.y)}};
        const uint3 tpg{{gx * tgs.x + tpt.x, gy * tgs.y + tpt.y, gz * tgs.z + tpt.z}};
        (void)tpt; (void)tpg; (void)nthreads;
        {kname}{targs}({", ".join(call_args)});
      }});
    }}
    for (auto& t : threads) t.join();
  }}
}}
""")
    return "\n".join(lines), plan


_LOADED: dict[str, ctypes.CDLL] = {}


def _run_gxx(args, what):
    proc = subprocess.run(["g++", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"g++ failed on {what}:\n{proc.stderr[-6000:]}")


def _precompiled_header() -> Path:
    """A directory holding metal_compat.h and its precompiled form (parsing the standard
    headers is most of a kernel's compile time)."""
    compat = (HERE / "metal_compat.h").read_text()
    key = hashlib.sha256((compat + " ".join(CXXFLAGS)).encode()).hexdigest()[:16]
    d = CACHE / f"pch_{key}"
    if not (d / "metal_compat.h.gch").exists():
        d.mkdir(parents=True, exist_ok=True)
        (d / "metal_compat.h").write_text(compat)
        tmp = d / f"metal_compat.h.gch.{os.getpid()}"
        flags = [f for f in CXXFLAGS if f != "-shared"]
        _run_gxx([*flags, "-x", "c++-header", str(d / "metal_compat.h"), "-o", str(tmp)],
                 "metal_compat.h")
        os.replace(tmp, d / "metal_compat.h.gch")
    return d


def _build(text: str) -> ctypes.CDLL:
    """Compile (or reuse) the shared library of `text`."""
    inc = _precompiled_header()
    key = hashlib.sha256((text + inc.name).encode()).hexdigest()[:24]
    if key in _LOADED:
        return _LOADED[key]
    lib = CACHE / f"k_{key}.so"
    if not lib.exists():
        src = CACHE / f"k_{key}_{os.getpid()}.cpp"
        src.write_text(text)
        tmp = CACHE / f"k_{key}_{os.getpid()}.so"
        _run_gxx([*CXXFLAGS, f"-I{inc}", str(src), "-o", str(tmp)], str(src))
        os.replace(tmp, lib)  # atomic: concurrent test processes may build the same key
        src.unlink()
    _LOADED[key] = ctypes.CDLL(str(lib))
    return _LOADED[key]


def run_kernel(name, header, source, input_names, output_names, inputs, *, template=(), grid,
               threadgroup, output_shapes, output_dtypes, init_value=None, verbose=False):
    """Run a kernel body on NumPy arrays, as mx.fast.metal_kernel(...)(...) would on the GPU.

    Inputs are made row contiguous (MLX's ensure_row_contiguous=True). Outputs without
    init_value start as NaN (integers: a fixed pattern), so an element the kernel forgets to
    write shows up. Returns the list of outputs (NumPy arrays).
    """
    inputs = [np.ascontiguousarray(x) for x in inputs]
    if len(inputs) != len(input_names) or len(output_shapes) != len(output_names):
        raise HarnessError("the numbers of inputs/outputs do not match their names")
    if any(t < 1 for t in (*grid, *threadgroup)):
        raise HarnessError(f"grid {grid} and threadgroup {threadgroup} must be positive")
    if np.prod([min(t, g) for t, g in zip(threadgroup, grid)]) > 1024:
        raise HarnessError(f"threadgroup {threadgroup} has more than 1024 threads")
    text, plan = generate(name, header, source, input_names, inputs, output_names,
                          output_dtypes, template)
    if verbose:
        print(text)
    lib = _build(text)

    outputs = []
    for shape, dt in zip(output_shapes, output_dtypes):
        dt = _np_dtype(dt)
        fill = init_value if init_value is not None else (np.nan if dt.kind == "f" else 0x5A)
        outputs.append(np.full(tuple(shape), fill, dtype=dt))
    keep = []  # buffers alive during the call

    def ptr(a):
        keep.append(a)
        return a.ctypes.data_as(ctypes.c_void_p)

    args = []
    for kind, i in plan:
        x = inputs[i] if kind != "output" else outputs[i]
        if kind in ("input", "output"):
            args.append(ptr(x))
        elif kind == "shape":
            args.append(ptr(np.array(x.shape, np.int32)))
        elif kind == "strides":
            args.append(ptr(np.array([s // x.itemsize for s in x.strides], np.int64)))
        else:
            args.append(ptr(np.array([x.ndim], np.int32)))
    argv = (ctypes.c_void_p * max(len(args), 1))(*args)
    g = (ctypes.c_uint * 3)(*grid)
    t = (ctypes.c_uint * 3)(*threadgroup)
    lib.mh_launch(argv, g, t)
    return outputs


def mlx_launch(sources: dict, io: dict):
    """A drop-in for backends.mlx.kernels._launch that runs the kernels through the harness.

    sources: name -> (header, source) (KERNEL_SOURCES); io: name -> (input_names, output_names).
    Records each call's (name, template, grid, threadgroup) in `.calls`.
    """
    import mlx.core as mx

    def to_np(x):
        if x.dtype == mx.bfloat16:
            return np.array(x.astype(mx.float32)).astype(ml_dtypes.bfloat16)
        return np.array(x)

    def to_mx(x):
        if x.dtype == np.dtype(ml_dtypes.bfloat16):
            return mx.array(x.astype(np.float32)).astype(mx.bfloat16)
        return mx.array(x)

    def launch(name, inputs, *, template, grid, threadgroup, output_shapes, output_dtypes,
               init_value=None):
        header, source = sources[name]
        input_names, output_names = io[name]
        launch.calls.append((name, tuple(template), tuple(grid), tuple(threadgroup)))
        outs = run_kernel(name, header, source, input_names, output_names,
                          [to_np(x) for x in inputs], template=template, grid=grid,
                          threadgroup=threadgroup, output_shapes=output_shapes,
                          output_dtypes=output_dtypes, init_value=init_value)
        return [to_mx(o) for o in outs]

    launch.calls = []
    return launch
