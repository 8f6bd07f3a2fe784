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

# kernel name -> (raw kernel, pointer dtypes (T = compute dtype, A = accumulator, F = the
# adapters' dtype), strides that are 1 in the usual row-major layouts, variants). Each variant
# is a set of constexprs plus the adapters' dtype: "heavy" turns every optional stage on (tail
# masks, dropout, bias, atomics, the largest rank block, PEFT's fp32 adapters); "even" is the
# other side (no tail masks, deterministic stores, adapters in the compute dtype).
R_MAX = configs.MAX_BLOCK_R
KERNELS = {
    "shrink": (_FWD._lora_shrink_kernel,
               dict(x_ptr="T", a_ptr="F", s_ptr="A", seed_ptr="i64"),
               ("stride_xk", "stride_ak", "stride_sr"),
               {"heavy": (dict(HAS_DROPOUT=True, EVEN_K=False, BLOCK_R=R_MAX), "fp32"),
                "even": (dict(HAS_DROPOUT=True, EVEN_K=True, BLOCK_R=R_MAX), "T")}),
    "fwd": (_FWD._lora_linear_fwd_kernel,
            dict(x_ptr="T", w_ptr="T", s_ptr="A", b_ptr="F", bias_ptr="T", y_ptr="T", scale_ptr="A"),
            ("stride_xk", "stride_wk", "stride_sr", "stride_br", "stride_yn", "stride_bias"),
            {"heavy": (dict(HAS_BIAS=True, EVEN_K=False), "fp32"),
             "even": (dict(HAS_BIAS=False, EVEN_K=True), "T")}),
    "bwd_dy": (_BWD._lora_bwd_dy_kernel,
               dict(dy_ptr="T", b_ptr="F", s_ptr="A", ds_ptr="A", db_ptr="A", scale_ptr="A"),
               ("stride_dyn", "stride_br", "stride_sr", "stride_dsr", "stride_dbr"),
               {"heavy": (dict(COMPUTE_DS=True, COMPUTE_DB=True, EVEN_N=False, BLOCK_R=R_MAX), "fp32"),
                "even": (dict(COMPUTE_DS=True, COMPUTE_DB=False, EVEN_N=True, BLOCK_R=R_MAX), "T")}),
    "bwd_dx": (_BWD._lora_bwd_dx_kernel,
               dict(dy_ptr="T", w_ptr="T", ds_ptr="A", a_ptr="F", dx_ptr="T", seed_ptr="i64"),
               ("stride_dyn", "stride_wk", "stride_dsr", "stride_ak", "stride_dxk"),
               {"heavy": (dict(HAS_DROPOUT=True, EVEN_N=False), "fp32"),
                "even": (dict(HAS_DROPOUT=True, EVEN_N=True), "T")}),
    "bwd_da": (_BWD._lora_bwd_da_kernel,
               dict(ds_ptr="A", x_ptr="T", da_ptr="A", seed_ptr="i64", s_ptr="A", dy_ptr="T", db_ptr="A",
                    scale_ptr="A"),
               ("stride_dsr", "stride_xk", "stride_dak", "stride_sr", "stride_dyn", "stride_dbr"),
               {"heavy": (dict(DO_DA=True, DO_DB=False, HAS_DROPOUT=True, ATOMIC=True, BLOCK_R=R_MAX), "fp32"),
                "even": (dict(DO_DA=True, DO_DB=True, HAS_DROPOUT=True, ATOMIC=False, BLOCK_R=R_MAX), "T")}),
}
_FLOAT_ARGS = ("keep_scale",)
_UNALIGNED_INTS = ("M", "M_KEY", "keep_thresh")  # do_not_specialize / arbitrary values


@dataclasses.dataclass
class Resources:
    kernel: str
    arch: int
    dtype: str
    variant: str
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


def family(arch):
    """Config family of ``sm_<arch>`` (e.g. 90 -> "sm90", 120 -> "sm86")."""
    return configs.arch_of((arch // 10, arch % 10))


def compile_config(kernel, arch, dtype, cfg, variant="heavy"):
    """Compile one config of ``kernel`` for ``sm_<arch>``, ``dtype`` and ``variant``; return
    its Resources."""
    fn, ptrs, unit_strides, variants = KERNELS[kernel]
    constexpr_variant, adapter = variants[variant]
    acc = "fp64" if dtype == "fp64" else "fp32"
    adapter = _TL[dtype] if adapter == "T" or dtype == "fp64" else adapter
    meta = {**constexpr_variant, **cfg.kwargs}
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
            signature[name] = "*" + {"T": _TL[dtype], "A": acc, "F": adapter}.get(t, t)
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
        sm = f"sm_{arch}a" if arch in (90, 100, 120) else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, f"-arch={sm}", "-v", os.path.join(d, "k.ptx"),
                              "-o", os.path.join(d, "v.cubin")], capture_output=True, text=True).stderr
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True).stdout
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if spill is None or res is None:
        raise RuntimeError(f"could not read resources of {kernel} sm_{arch}:\n{log}\n{usage}")
    return Resources(
        kernel=kernel, arch=arch, dtype=dtype, variant=variant,
        config=" ".join(f"{k}={v}" for k, v in cfg.kwargs.items()),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        registers=int(res.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
        stack=int(res.group(2)), shared=compiled.metadata.shared,
        shared_limit=configs.SHARED_LIMIT[family(arch)],
        wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
    )


def _compile_job(job):
    kernel, arch, dtype, (meta, warps, stages), variant = job
    return compile_config(kernel, arch, dtype, triton.Config(meta, num_warps=warps, num_stages=stages), variant)


def shipped(arches=(80, 86, 90, 120), dtypes=("bf16", "fp16"), ci=False):
    """(kernel, arch, dtype, config, variant) for every config a GPU launch can pick.

    ``ci=True`` keeps every config of every architecture in both variants for bf16 and fp32 (the
    2- and 4-byte config lists), and adds fp16 on sm_90 (wgmma) and fp64 on sm_80/sm_90 in the
    heavy variant only: fp16 shares bf16's configs and code shape, and compiling all of it
    would double the CI time for no new config."""
    for kernel, (_, _, _, variants) in KERNELS.items():
        for arch in arches:
            for dtype in dtypes:
                if ci and ((dtype == "fp16" and arch != 90) or (dtype == "fp64" and arch not in (80, 90))):
                    continue
                for cfg in configs.configs_for(kernel, family(arch), _ITEMSIZE[dtype]):
                    for variant in variants:
                        if ci and dtype in ("fp16", "fp64") and variant != "heavy":
                            continue
                        yield kernel, arch, dtype, cfg, variant


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90, 120])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(_TL))
    ap.add_argument("--csv", help="also write the table to this CSV file")
    ap.add_argument("--ci", action="store_true", help="the reduced matrix the test suite compiles (see shipped())")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    args = ap.parse_args(argv)
    rows = []
    hdr = f"{'kernel':8} {'sm':>3} {'dtype':5} {'variant':7} {'config':42} {'w':>2} {'s':>2} {'regs':>4} " \
          f"{'spill':>6} {'stack':>5} {'shared':>7} {'tc':6}"
    print(hdr)
    todo = [(k, a, d, (c.kwargs, c.num_warps, c.num_stages), v) for k, a, d, c, v in shipped(args.arch, args.dtype, ci=args.ci)]
    if args.jobs > 1:
        import concurrent.futures
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_compile_job, todo)
    else:
        pool, results = None, map(_compile_job, todo)
    for r in results:
        rows.append(r)
        tc = "wgmma" if r.wgmma else ("mma" if r.mma_sync else "-")
        print(f"{r.kernel:8} {r.arch:>3} {r.dtype:5} {r.variant:7} {r.config:42} {r.num_warps:>2} "
              f"{r.num_stages:>2} {r.registers:>4} {r.spill_stores:>6} {r.stack:>5} {r.shared:>7} {tc:6}", flush=True)
    if pool is not None:
        pool.shutdown()
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
