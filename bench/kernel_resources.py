"""Compile every shipped kernel config for sm_80 / sm_86 / sm_90 / sm_120 on the CPU and read its SASS.

No GPU needed: ``triton.compile`` with an explicit ``GPUTarget`` produces PTX and a cubin;
``ptxas -v`` (the one Triton itself uses for that architecture) reports spill bytes,
``cuobjdump -res-usage`` registers, stack and shared memory, and ``cuobjdump -sass`` the machine
code, from which this module counts what decides speed (FIELD.md §4):

* ``scalar_loads``: sub-word global loads (``LDG.E.U16`` / ``.S16`` / ``.U8`` / ``.S8``): a tile
  that lost its contiguity is read 2 bytes at a time.
* ``loop_sync_loads``: plain (synchronous) global loads inside loop bodies (a backward ``BRA``
  and its target): a streamed operand that is not copied asynchronously.
* ``async_copies`` / ``loop_async_copies``: ``LDGSTS`` (cp.async), ``tma_loads``: ``UTMALDG``.
* ``wgmma`` (``HGMMA``, Hopper warpgroup MMA), ``mma`` (``HMMA``/``DMMA``/``IMMA``, warp MMA).
* ``ctas_per_sm``: resident CTAs per SM allowed by shared memory (plus the 1 KiB each CTA
  reserves) and by registers (allocated per warp in units of 256).

Each config is compiled in several variants (``VARIANTS``): "heavy" turns every optional stage on
(dropout, bias, tail masks, atomics, PEFT's fp32 adapters and fp32 LoRA math, the largest rank
block), "even" is the other side (no tail masks, deterministic stores, adapters and LoRA math in
the compute dtype, r = 16), "trans" reads a transposed weight (GPT-2 Conv1D passes ``weight.t()``)
and, for the dA kernel, "hybrid" adds dx's LoRA term (``ADD_DX``). All get the 16-byte alignment
and the unit inner strides that real launches are specialised for.

    python -m bench.kernel_resources [--arch 80 90] [--dtype bf16 fp16] [--csv out.csv] [--ci]
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
_DQ = importlib.import_module("fastlora.kernels.dequant")
_DORA = importlib.import_module("fastlora.kernels.dora")

_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}

R_MAX = configs.MAX_BLOCK_R
R_GEMM = configs.GEMM_BLOCK_R
# kernel -> (raw kernel, pointer dtypes (T = compute dtype, A = accumulator, F = the adapters'
# dtype), the strides that are 1 in the usual row-major layouts, the streamed operands (each
# must be copied asynchronously in the main loop), variants). A variant is (constexprs, adapter
# dtype ("T" or a dtype), LoRA dtype ("T" or a dtype), unit strides replacing the default ones
# or None).
KERNELS = {
    "shrink": (_FWD._lora_shrink_kernel,
               dict(x_ptr="T", a_ptr="F", s_ptr="A", seed_ptr="i64"),
               ("stride_xk", "stride_ak", "stride_sr"), ("x", "A"),
               {"heavy": (dict(HAS_DROPOUT=True, ATOMIC=True, EVEN_K=False, BLOCK_R=R_MAX), "fp32", "fp32", None),
                "heavy-r16": (dict(HAS_DROPOUT=True, ATOMIC=True, EVEN_K=False, BLOCK_R=16), "fp32", "fp32", None),
                "heavy-r32": (dict(HAS_DROPOUT=True, ATOMIC=True, EVEN_K=False, BLOCK_R=32), "fp32", "fp32", None),
                "even": (dict(HAS_DROPOUT=True, ATOMIC=False, EVEN_K=True, BLOCK_R=16), "T", "T", None)}),
    "fwd": (_FWD._lora_linear_fwd_kernel,
            dict(x_ptr="T", w_ptr="T", s_ptr="A", b_ptr="F", bias_ptr="T", y_ptr="T", scale_ptr="A", g_ptr="A",
                 z_ptr="T"),
            ("stride_xk", "stride_wk", "stride_sr", "stride_br", "stride_yn", "stride_bias"), ("x", "W"),
            {"heavy": (dict(HAS_BIAS=True, EVEN_K=False, COL_SCALE=False, STORE_Z=False, BLOCK_R=R_GEMM),
                       "fp32", "fp32", None),
             "even": (dict(HAS_BIAS=False, EVEN_K=True, COL_SCALE=False, STORE_Z=False, BLOCK_R=R_GEMM),
                      "T", "T", None),
             "trans": (dict(HAS_BIAS=True, EVEN_K=False, COL_SCALE=False, STORE_Z=False, BLOCK_R=R_GEMM),
                       "fp32", "fp32",
                       ("stride_xk", "stride_wn", "stride_sr", "stride_br", "stride_yn", "stride_bias")),
             # DoRA's epilogue: the column scale g and the stored z on top of the heavy variant
             "dora": (dict(HAS_BIAS=True, EVEN_K=False, COL_SCALE=True, STORE_Z=True, BLOCK_R=R_GEMM),
                      "fp32", "fp32", None)}),
    "expand": (_FWD._lora_expand_kernel,
               dict(y_ptr="T", s_ptr="A", b_ptr="F", scale_ptr="A", bias_ptr="T", g_ptr="A", z_ptr="T"),
               ("stride_yn", "stride_sr", "stride_br", "stride_bias"), (),
               {"heavy": (dict(HAS_BIAS=False, COL_SCALE=False, STORE_Z=False, BLOCK_R=R_GEMM), "fp32", "fp32",
                          None),
                "even": (dict(HAS_BIAS=False, COL_SCALE=False, STORE_Z=False, BLOCK_R=R_GEMM), "T", "T", None),
                "dora": (dict(HAS_BIAS=True, COL_SCALE=True, STORE_Z=True, BLOCK_R=R_GEMM), "fp32", "fp32",
                         None)}),
    "bwd_dy": (_BWD._lora_bwd_dy_kernel,
               dict(dy_ptr="T", b_ptr="F", s_ptr="A", ds_ptr="A", db_ptr="A", scale_ptr="A", g_ptr="A", z_ptr="T",
                    cs_ptr="A"),
               ("stride_dyn", "stride_br", "stride_sr", "stride_dsr", "stride_dbr", "stride_zn"), ("dy", "B"),
               {"heavy": (dict(COMPUTE_DS=True, COMPUTE_DB=True, ATOMIC_DS=True, EVEN_N=False, COL_SCALE=False, COLSUM=False, BLOCK_R=R_MAX),
                          "fp32", "fp32", None),
                "heavy-r16": (dict(COMPUTE_DS=True, COMPUTE_DB=True, ATOMIC_DS=True, EVEN_N=False, COL_SCALE=False, COLSUM=False, BLOCK_R=16),
                              "fp32", "fp32", None),
                "heavy-r32": (dict(COMPUTE_DS=True, COMPUTE_DB=True, ATOMIC_DS=True, EVEN_N=False, COL_SCALE=False, COLSUM=False, BLOCK_R=32),
                              "fp32", "fp32", None),
                "even": (dict(COMPUTE_DS=True, COMPUTE_DB=False, ATOMIC_DS=False, EVEN_N=True, COL_SCALE=False, COLSUM=False, BLOCK_R=16),
                         "T", "T", None),
                # DoRA's fused backward: dy ⊙ g as the tile loads, and Σ dy ⊙ z from the same tiles
                "dora": (dict(COMPUTE_DS=True, COMPUTE_DB=True, ATOMIC_DS=False, EVEN_N=False, COL_SCALE=True,
                              COLSUM=True, BLOCK_R=16), "fp32", "fp32", None),
                "dora-r64": (dict(COMPUTE_DS=True, COMPUTE_DB=True, ATOMIC_DS=True, EVEN_N=False, COL_SCALE=True,
                                  COLSUM=True, BLOCK_R=R_MAX), "fp32", "fp32", None),
                "dora-even": (dict(COMPUTE_DS=True, COMPUTE_DB=False, ATOMIC_DS=False, EVEN_N=True, COL_SCALE=True,
                                   COLSUM=True, BLOCK_R=16), "T", "T", None)}),
    "bwd_dx": (_BWD._lora_bwd_dx_kernel,
               dict(dy_ptr="T", w_ptr="T", ds_ptr="A", a_ptr="F", dx_ptr="T", seed_ptr="i64", g_ptr="A"),
               ("stride_dyn", "stride_wk", "stride_dsr", "stride_ak", "stride_dxk"), ("dy", "W"),
               {"heavy": (dict(HAS_DROPOUT=True, EVEN_N=False, COL_SCALE=False, BLOCK_R=R_GEMM), "fp32", "fp32", None),
                "even": (dict(HAS_DROPOUT=True, EVEN_N=True, COL_SCALE=False, BLOCK_R=R_GEMM), "T", "T", None),
                "trans": (dict(HAS_DROPOUT=True, EVEN_N=False, COL_SCALE=False, BLOCK_R=R_GEMM), "fp32", "fp32",
                          ("stride_dyn", "stride_wn", "stride_dsr", "stride_ak", "stride_dxk")),
                # DoRA: the dy tile scaled by g in the main loop (dz = dy ⊙ g never stored)
                "dora": (dict(HAS_DROPOUT=True, EVEN_N=False, COL_SCALE=True, BLOCK_R=R_GEMM), "fp32", "fp32", None),
                "dora-even": (dict(HAS_DROPOUT=True, EVEN_N=True, COL_SCALE=True, BLOCK_R=R_GEMM), "T", "T", None)}),
    "bwd_da": (_BWD._lora_bwd_da_kernel,
               dict(ds_ptr="A", x_ptr="T", da_ptr="A", seed_ptr="i64", s_ptr="A", dy_ptr="T", db_ptr="A",
                    scale_ptr="A", a_ptr="F", dx_ptr="T", g_ptr="A"),
               ("stride_dsr", "stride_xk", "stride_dak", "stride_sr", "stride_dyn", "stride_dbr", "stride_ak",
                "stride_dxk"), ("dS", "x"),
               {"heavy": (dict(DO_DA=True, DO_DB=False, ADD_DX=False, HAS_DROPOUT=True, COL_SCALE=False, ATOMIC=True, BLOCK_R=R_MAX),
                          "fp32", "fp32", None),
                "heavy-r16": (dict(DO_DA=True, DO_DB=False, ADD_DX=False, HAS_DROPOUT=True, COL_SCALE=False, ATOMIC=True, BLOCK_R=16),
                              "fp32", "fp32", None),
                "heavy-r32": (dict(DO_DA=True, DO_DB=False, ADD_DX=False, HAS_DROPOUT=True, COL_SCALE=False, ATOMIC=True, BLOCK_R=32),
                              "fp32", "fp32", None),
                "even": (dict(DO_DA=True, DO_DB=True, ADD_DX=False, HAS_DROPOUT=True, COL_SCALE=False, ATOMIC=False, BLOCK_R=16),
                         "T", "T", None),
                "hybrid": (dict(DO_DA=True, DO_DB=False, ADD_DX=True, HAS_DROPOUT=True, COL_SCALE=False, ATOMIC=True, BLOCK_R=16),
                           "fp32", "fp32", None),
                "hybrid-r32": (dict(DO_DA=True, DO_DB=False, ADD_DX=True, HAS_DROPOUT=True, COL_SCALE=False, ATOMIC=True,
                                    BLOCK_R=configs.MAX_FULL_RANK), "fp32", "fp32", None),
                # DoRA, deterministic mode: dB = s·Sᵀ·(dy ⊙ g) with g on the dy tile
                "dora-even": (dict(DO_DA=True, DO_DB=True, ADD_DX=False, HAS_DROPOUT=True, COL_SCALE=True,
                                   ATOMIC=False, BLOCK_R=16), "T", "T", None)}),
    # QLoRA: the dequantization kernels (one tile per program, no loop: the gates check their
    # loads and stores are 16-byte vectors instead)
    "dequant_4bit": (_DQ._dequant_4bit_kernel,
                     dict(q_ptr="i32", code_ptr="fp32", absmax_ptr="fp32", qabsmax_ptr="u8", absmax2_ptr="fp32",
                          code2_ptr="fp32", offset_ptr="fp32", out_ptr="T"),
                     (), (),
                     {"nf4-64": (dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=False, BF16_BY_BITS=False),
                                 "T", "T", None),
                      "nested-64": (dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=True, BF16_BY_BITS=False),
                                    "T", "T", None),
                      "nested-256": (dict(BLOCKSIZE=256, BLOCKSIZE2=256, NESTED=True, BF16_BY_BITS=False),
                                     "T", "T", None)}),
    "dequant_int8": (_DQ._dequant_int8_kernel,
                     dict(cb_ptr="i8", scb_ptr="fp32", out_ptr="T"),
                     ("stride_ck", "stride_ok"), (),
                     {"int8": (dict(BF16_BY_BITS=False), "T", "T", None)}),
    # DoRA: the row norm of W + s·B·A (one pass over W) and the dy pass (dz = dy ⊙ g, Σ dy ⊙ z)
    "dora_norm": (_DORA._dora_norm_kernel,
                  dict(w_ptr="T", a_ptr="F", b_ptr="F", scale_ptr="A", part_ptr="A"),
                  ("stride_wk", "stride_ak", "stride_br"), ("W",),
                  {"heavy": (dict(_DORA.norm_meta(32), PRECISION="tf32x3"), "fp32", "T", None),
                   "even": (dict(_DORA.norm_meta(16), PRECISION="tf32x3"), "T", "T", None),
                   "trans": (dict(_DORA.norm_meta(16, w_kn=True), PRECISION="tf32x3"), "fp32", "T",
                             ("stride_wn", "stride_ak", "stride_br")),
                   "r64": (dict(_DORA.norm_meta(64), PRECISION="tf32x3"), "fp32", "T", None),
                   "r128": (dict(_DORA.norm_meta(128), PRECISION="tf32x3"), "fp32", "T", None),
                   "chunked": (dict(_DORA.norm_meta(256), PRECISION="tf32x3"), "fp32", "T", None)}),
    "dora_dy": (_DORA._dora_dy_kernel,
                dict(dy_ptr="T", z_ptr="T", g_ptr="A", dz_ptr="T", part_ptr="A"),
                ("stride_dyn", "stride_zn"), ("dy", "z"),
                {"heavy": (dict(SCALE_DY=True, COLSUM=True), "T", "T", None)}),
}
DEQUANT_KERNELS = ("dequant_4bit", "dequant_int8")
DORA_KERNELS = ("dora_norm", "dora_dy")
# kernels launched with one fixed config each (bandwidth-bound, no tuning): the launch configs of
# kernels/dequant.py's and kernels/dora.py's launchers (compiled GPU)
DEQUANT_CONFIGS = {"dequant_4bit": (dict(BLOCK_WORDS=256), 4, 3), "dequant_int8": (dict(BLOCK_N=16, BLOCK_K=256), 4, 3)}
FIXED_CONFIGS = {**DEQUANT_CONFIGS,
                 "dora_norm": ({}, _DORA.NORM_WARPS, _DORA.NORM_STAGES),  # tiles: the variant's norm_meta
                 "dora_dy": ({n: v for n, v in _DORA.DY_CONFIG.items() if n.isupper()}, _DORA.DY_CONFIG["num_warps"],
                             _DORA.DY_CONFIG["num_stages"])}
_FLOAT_ARGS = ("keep_scale",)
# arbitrary values (the dequant kernels' sizes are multiples of 16 in real layers: specialised so)
_UNALIGNED_INTS = ("M", "M_KEY", "keep_thresh")


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
    ctas_per_sm: int
    intended_ctas: int
    wgmma: int
    mma: int
    scalar_loads: int
    loop_sync_loads: int
    async_copies: int
    loop_async_copies: int
    tma_loads: int
    streamed: int
    vector_loads: int = 0
    vector_stores: int = 0
    scalar_stores: int = 0


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def family(arch):
    """Config family of ``sm_<arch>`` (e.g. 90 -> "sm90", 120 -> "sm86")."""
    return configs.arch_of((arch // 10, arch % 10))


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRA_TARGET = re.compile(r"0x([0-9a-f]+)")


def parse_sass(sass):
    """Instructions ``[(address, opcode, operands)]`` and the loop bodies ``[(start, end)]`` (address
    ranges closed by a backward branch: ``cuobjdump`` prints ``BRA 0x<target>``) of one kernel's
    ``cuobjdump -sass`` text."""
    insns = []
    for line in sass.splitlines():
        m = _INSN.search(line)
        if m:
            insns.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = []
    for addr, op, rest in insns:
        if op == "BRA" or op.startswith("BRA."):
            t = _BRA_TARGET.search(rest)
            if t and int(t.group(1), 16) < addr:  # not the trailing self-branch
                loops.append((int(t.group(1), 16), addr))
    return insns, loops


def sass_counts(sass):
    """The counts named in the module docstring, from one kernel's SASS."""
    insns, loops = parse_sass(sass)

    def in_loop(a):
        return any(s <= a <= e for s, e in loops)

    c = dict(scalar_loads=0, loop_sync_loads=0, async_copies=0, loop_async_copies=0, tma_loads=0, wgmma=0, mma=0,
             vector_loads=0, vector_stores=0, scalar_stores=0)
    for addr, op, _ in insns:
        if op.startswith("STG."):
            c["vector_stores"] += ".128" in op
            c["scalar_stores"] += bool(re.search(r"\.(U|S)(8|16)\b", op))
        if op.startswith("LDG."):
            c["vector_loads"] += ".128" in op
            if re.search(r"\.(U|S)(8|16)\b", op):
                c["scalar_loads"] += 1
            if in_loop(addr):
                c["loop_sync_loads"] += 1
        elif op.startswith("LDGSTS"):
            c["async_copies"] += 1
            c["loop_async_copies"] += in_loop(addr)
        elif op.startswith("UTMALDG"):
            c["tma_loads"] += 1
            c["loop_async_copies"] += in_loop(addr)
        elif op.startswith("HGMMA"):
            c["wgmma"] += 1
        elif op.startswith(("HMMA", "DMMA", "IMMA")):
            c["mma"] += 1
    return c


def ctas_per_sm(arch, shared, registers, num_warps):
    """Resident CTAs per SM allowed by shared memory (+1 KiB reserved per CTA from sm_80 on),
    registers (64K per SM, allocated per warp in units of 256) and threads (2048 per SM; 1536 on
    sm_86/sm_120)."""
    fam = family(arch)
    by_smem = configs.SHARED_PER_SM[fam] // (shared + 1024)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    max_threads = 1536 if fam == "sm86" else 2048
    return max(0, min(by_smem, by_regs, max_threads // (32 * num_warps), 32))


def _lora_constexprs(dtype, lora, tf32):
    """The LoRA-math constexprs a launch passes for compute dtype ``dtype`` and LoRA dtype ``lora``
    with torch's fp32 matmul precision set to tf32 or ieee."""
    import torch
    from fastlora.kernels import launch
    td = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    from unittest import mock
    with mock.patch.object(launch, "tf32_allowed", lambda: tf32):
        return {**launch.stream_lora_args(td[dtype], td[lora]), **launch.epilogue_lora_args(td[dtype], td[lora])}


def compile_config(kernel, arch, dtype, cfg, variant="heavy"):
    """Compile one config of ``kernel`` for ``sm_<arch>``, ``dtype`` and ``variant``; return
    its Resources."""
    fn, ptrs, unit_strides, streamed, variants = KERNELS[kernel]
    constexpr_variant, adapter, lora, unit_override = variants[variant]
    acc = "fp64" if dtype == "fp64" else "fp32"
    adapter = dtype if adapter == "T" or dtype == "fp64" else adapter
    lora = dtype if lora == "T" or dtype == "fp64" else lora
    meta = {**{k: v for k, v in cfg.kwargs.items() if k != "SPLIT"}, **constexpr_variant,
            "NUM_STAGES": cfg.num_stages}  # as launch.py passes it
    # fp32 matmuls: ieee (torch's default) in every variant but "even", which takes tf32
    tf32 = variant == "even"
    meta["DOT_PRECISION"] = "tf32" if dtype == "fp32" and tf32 else "ieee"
    meta.update(_lora_constexprs(dtype, lora, tf32))
    if dtype == "fp64" and "PRECISION" in meta:  # dora_norm: fp64 dots are exact ("ieee")
        meta["PRECISION"] = "ieee"
    constexprs = {k: v for k, v in meta.items() if k in fn.arg_names}
    constexprs.update({s: 1 for s in (unit_override or unit_strides)})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ptrs:
            t = ptrs[name]
            signature[name] = "*" + {"T": dtype, "A": acc, "F": adapter}.get(t, t)
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
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        from triton.backends.nvidia.compiler import get_ptxas
        sm = f"sm_{arch}a" if arch in (90, 100, 120) else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, f"-arch={sm}", "-v", os.path.join(d, "k.ptx"),
                              "-o", os.path.join(d, "v.cubin")], capture_output=True, text=True).stderr
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if spill is None or res is None or not sass:
        raise RuntimeError(f"could not read resources of {kernel} sm_{arch}:\n{log}\n{usage}")
    shared, regs = compiled.metadata.shared, int(res.group(1))
    return Resources(
        kernel=kernel, arch=arch, dtype=dtype, variant=variant,
        config=" ".join(f"{k}={v}" for k, v in cfg.kwargs.items()),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        registers=regs, spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
        stack=int(res.group(2)), shared=shared, shared_limit=configs.SHARED_LIMIT[family(arch)],
        ctas_per_sm=ctas_per_sm(arch, shared, regs, cfg.num_warps), intended_ctas=configs.intended_ctas(cfg),
        streamed=len(streamed),
        **sass_counts(sass),
    )


def _compile_job(job):
    kernel, arch, dtype, (meta, warps, stages, ctas), variant = job
    cfg = triton.Config(meta, num_warps=warps, num_stages=stages)
    cfg.intended_ctas = ctas
    return compile_config(kernel, arch, dtype, cfg, variant)


def shipped(arches=(80, 86, 90, 120), dtypes=("bf16", "fp16"), ci=False):
    """(kernel, arch, dtype, config, variant) for every config a GPU launch can pick.

    ``ci=True`` keeps every config of every architecture in every variant for bf16 and fp32 (the
    2- and 4-byte config lists), and adds fp16 on sm_90 (wgmma) and fp64 on sm_80/sm_90 in the
    heavy variant only: fp16 shares bf16's configs and code shape, and compiling all of it
    would double the CI time for no new config."""
    for kernel, (_, _, _, _, variants) in KERNELS.items():
        for arch in arches:
            for dtype in dtypes:
                if ci and ((dtype == "fp16" and arch != 90) or (dtype == "fp64" and arch not in (80, 90))):
                    continue
                if kernel in FIXED_CONFIGS:
                    if dtype != "fp64" or kernel not in DEQUANT_KERNELS:  # bitsandbytes: 16/32-bit floats only
                        meta, warps, stages = FIXED_CONFIGS[kernel]
                        for variant in variants:
                            if ci and dtype in ("fp16", "fp64") and kernel in DORA_KERNELS and variant != "heavy":
                                continue
                            yield kernel, arch, dtype, triton.Config(meta, num_warps=warps, num_stages=stages), variant
                    continue
                for variant, (meta, _, _, _) in variants.items():
                    if ci and dtype in ("fp16", "fp64") and variant != "heavy":
                        continue
                    for cfg in configs.configs_for(kernel, family(arch), _ITEMSIZE[dtype], meta["BLOCK_R"],
                                                   meta.get("ADD_DX", False), configs.is_dora(meta)):
                        yield kernel, arch, dtype, cfg, variant


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90, 120])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(_ITEMSIZE))
    ap.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--variant", nargs="+", help="only these variants")
    ap.add_argument("--csv", help="also write the table to this CSV file")
    ap.add_argument("--ci", action="store_true", help="the reduced matrix the test suite compiles (see shipped())")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    args = ap.parse_args(argv)
    rows = []
    hdr = (f"{'kernel':7} {'sm':>3} {'dtype':5} {'variant':7} {'config':48} {'w':>2} {'s':>2} {'regs':>4} "
           f"{'spill':>5} {'shared':>7} {'cta':>3} {'ldg16':>5} {'lpldg':>5} {'async':>5} {'tma':>3} "
           f"{'wgmma':>5} {'mma':>4}")
    print(hdr)
    todo = [(k, a, d, (c.kwargs, c.num_warps, c.num_stages, configs.intended_ctas(c)), v)
            for k, a, d, c, v in shipped(args.arch, args.dtype, ci=args.ci)
            if k in args.kernel and (not args.variant or v in args.variant)]
    if args.jobs > 1:
        import concurrent.futures
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_compile_job, todo)
    else:
        pool, results = None, map(_compile_job, todo)
    for r in results:
        rows.append(r)
        print(f"{r.kernel:7} {r.arch:>3} {r.dtype:5} {r.variant:7} {r.config:48} {r.num_warps:>2} "
              f"{r.num_stages:>2} {r.registers:>4} {r.spill_stores:>5} {r.shared:>7} {r.ctas_per_sm:>3} "
              f"{r.scalar_loads:>5} {r.loop_sync_loads:>5} {r.async_copies:>5} {r.tma_loads:>3} {r.wgmma:>5} "
              f"{r.mma:>4}", flush=True)
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
