"""Compile every shipped kernel config for sm_80 / sm_90 on the CPU and report its resources.

No GPU needed: ``triton.compile`` with an explicit ``GPUTarget`` produces PTX and a cubin;
``ptxas -v`` (the one Triton itself uses for that architecture) reports spill bytes, and
``cuobjdump -res-usage`` registers, stack and shared memory. Each config is compiled in its
heaviest variant (dropout on, bias on, tail masks on, both dS and dB, the largest rank block),
with the 16-byte alignment and unit inner strides that real launches get specialised for.

    python -m bench.kernel_resources [--arch 80 90] [--dtype bf16 fp16] [--csv out.csv]
"""
import argparse
import csv
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from fastlora.kernels import configs

_FWD = importlib.import_module("fastlora.kernels.lora_forward")
_BWD = importlib.import_module("fastlora.kernels.lora_backward")

_TL = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}
_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}

# kernel name -> (raw kernel, pointer dtypes (T = compute dtype, A = accumulator),
#                 strides that are 1 in the usual row-major layouts, heaviest variant)
KERNELS = {
    "shrink": (_FWD._lora_shrink_kernel,
               dict(x_ptr="T", a_ptr="fp32", s_ptr="A", seed_ptr="i64"),
               ("stride_xk", "stride_ak", "stride_sr"),
               dict(HAS_DROPOUT=True, EVEN_K=False, BLOCK_R=configs.MAX_BLOCK_R)),
    "fwd": (_FWD._lora_linear_fwd_kernel,
            dict(x_ptr="T", w_ptr="T", s_ptr="A", b_ptr="fp32", bias_ptr="T", y_ptr="T", scale_ptr="fp32"),
            ("stride_xk", "stride_wk", "stride_sr", "stride_br", "stride_yn"),
            dict(HAS_BIAS=True, EVEN_K=False)),
    "bwd_dy": (_BWD._lora_bwd_dy_kernel,
               dict(dy_ptr="T", b_ptr="fp32", s_ptr="A", ds_ptr="A", db_ptr="A", scale_ptr="fp32"),
               ("stride_dyn", "stride_br", "stride_sr", "stride_dsr", "stride_dbr"),
               dict(COMPUTE_DS=True, COMPUTE_DB=True, DB_ATOMIC=True, EVEN_N=False,
                    BLOCK_R=configs.MAX_BLOCK_R)),
    "bwd_dx": (_BWD._lora_bwd_dx_kernel,
               dict(dy_ptr="T", w_ptr="T", ds_ptr="A", a_ptr="fp32", dx_ptr="T", seed_ptr="i64"),
               ("stride_dyn", "stride_wk", "stride_dsr", "stride_ak", "stride_dxk"),
               dict(HAS_DROPOUT=True, EVEN_N=False)),
    "bwd_da": (_BWD._lora_bwd_da_kernel,
               dict(ds_ptr="A", x_ptr="T", da_ptr="A", seed_ptr="i64"),
               ("stride_dsr", "stride_xk", "stride_dak"),
               dict(HAS_DROPOUT=True, DA_ATOMIC=True, BLOCK_R=configs.MAX_BLOCK_R)),
}
_FLOAT_ARGS = ("keep_scale",)
_UNALIGNED_INTS = ("M", "M_KEY", "keep_thresh")  # do_not_specialize / arbitrary values


@dataclasses.dataclass
class Resources:
    kernel: str
    arch: int
    dtype: str
    config: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    shared_limit: int
    wgmma: bool
    mma_sync: bool


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_config(kernel, arch, dtype, cfg, variant=None):
    """Compile one config of ``kernel`` for ``sm_<arch>`` and ``dtype``; return its Resources."""
    fn, ptrs, unit_strides, heavy = KERNELS[kernel]
    itemsize = _ITEMSIZE[dtype]
    acc = "fp64" if dtype == "fp64" else "fp32"
    meta = {**heavy, **(variant or {}), **cfg.kwargs}
    meta["DOT_PRECISION"] = "tf32" if dtype == "fp32" else "ieee"
    constexprs = dict(meta)
    constexprs.update({s: 1 for s in unit_strides})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ptrs:
            t = ptrs[name]
            signature[name] = "*" + {"T": _TL[dtype], "A": acc}.get(t, t)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in _UNALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        with open(os.path.join(d, "k.cubin"), "wb") as f:
            f.write(compiled.asm["cubin"])
        from triton.backends.nvidia.compiler import get_ptxas
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, f"-arch={sm}", "-v", os.path.join(d, "k.ptx"),
                              "-o", os.path.join(d, "v.cubin")], capture_output=True, text=True).stderr
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True).stdout
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if spill is None or res is None:
        raise RuntimeError(f"could not read resources of {kernel} sm_{arch}:\n{log}\n{usage}")
    return Resources(
        kernel=kernel, arch=arch, dtype=dtype,
        config=" ".join(f"{k}={v}" for k, v in cfg.kwargs.items()),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        registers=int(res.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
        stack=int(res.group(2)), shared=compiled.metadata.shared,
        shared_limit=configs.SHARED_LIMIT[f"sm{arch}"],
        wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
    )


def shipped(arches=(80, 86, 90), dtypes=("bf16", "fp16")):
    """(kernel, arch, dtype, config) for every config a GPU launch can pick."""
    for kernel in KERNELS:
        for arch in arches:
            for dtype in dtypes:
                for cfg in configs.configs_for(kernel, f"sm{arch}", _ITEMSIZE[dtype]):
                    yield kernel, arch, dtype, cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(_TL))
    ap.add_argument("--csv", help="also write the table to this CSV file")
    args = ap.parse_args(argv)
    rows = []
    hdr = f"{'kernel':8} {'sm':>3} {'dtype':5} {'config':42} {'w':>2} {'s':>2} {'regs':>4} {'spill':>6} " \
          f"{'stack':>5} {'shared':>7} {'tc':6}"
    print(hdr)
    for kernel, arch, dtype, cfg in shipped(args.arch, args.dtype):
        r = compile_config(kernel, arch, dtype, cfg)
        rows.append(r)
        tc = "wgmma" if r.wgmma else ("mma" if r.mma_sync else "-")
        print(f"{r.kernel:8} {r.arch:>3} {r.dtype:5} {r.config:42} {r.num_warps:>2} {r.num_stages:>2} "
              f"{r.registers:>4} {r.spill_stores:>6} {r.stack:>5} {r.shared:>7} {tc:6}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Resources)])
            w.writeheader()
            for r in rows:
                w.writerow(dataclasses.asdict(r))
    bad = [r for r in rows if r.spill_stores or r.spill_loads or r.shared > r.shared_limit]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
