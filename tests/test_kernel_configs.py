"""Compile-time performance gates: every shipped kernel config, compiled for sm_80, sm_86, sm_90
and sm_120 on the CPU, read in its SASS.

No GPU needed (FIELD.md §4): ``bench/kernel_resources.py`` compiles each config in each of its
variants (heavy, even, transposed weight, hybrid dA pass) for each architecture and dtype, and
counts what the machine code does. The gates, per compiled kernel:

* no register spills, shared memory within the architecture's per-block limit, at least the CTAs
  per SM its config row is meant for (in the "even" variant, the common bf16/fp16 case);
* at most 2 scalar 8/16-bit global loads (epilogue scalars such as a bias element): a tile that
  lost its contiguity shows up as dozens;
* kernels that stream operands through a loop: the loop copies asynchronously (``LDGSTS`` or
  ``UTMALDG``), and holds no synchronous global load, except the hybrid dA pass's
  read-modify-write of dx (which feeds no MMA): at most its dx and dS tiles' 16-byte vectors;
* tensor-core instructions for 16-bit operands, ``wgmma`` for the sm_90 GEMMs;
* QLoRA's dequantization kernels: 16-byte stores, no scalar byte loads but the double-quantized
  absmax codes.

The compiler runs in a subprocess without TRITON_INTERPRET: kernels decorated for the
interpreter (as this test session's are, on a machine without a GPU) cannot be compiled.
"""
import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHES = (80, 86, 90, 120)
DTYPES = ("bf16", "fp16", "fp32", "fp64")
KERNELS = ("shrink", "fwd", "expand", "bwd_dy", "bwd_dx", "bwd_da")
GEMM_KERNELS = ("fwd", "bwd_dx")
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def resources(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources") / "resources.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.kernel_resources", "--ci", "--arch", *map(str, ARCHES), "--dtype", *DTYPES,
           "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"kernel_resources failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return list(csv.DictReader(f))


def _rmw_allowance(r):
    """16-byte vectors of the hybrid dA pass's dx tile (read, then written) and dS tile per thread."""
    meta = dict(kv.split("=") for kv in r["config"].split())
    from bench.kernel_resources import KERNELS as VARIANTS
    block_r = VARIANTS["bwd_da"][4][r["variant"]][0]["BLOCK_R"]
    threads = 32 * int(r["num_warps"])
    bm, bk = int(meta["BLOCK_M"]), int(meta["BLOCK_K"])
    vec = lambda nbytes: -(-nbytes // (16 * threads))  # noqa: E731
    return vec(bm * bk * ITEMSIZE[r["dtype"]]) + vec(bm * block_r * (8 if r["dtype"] == "fp64" else 4))


@pytest.mark.compile_only
@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_shipped_config_passes_the_sass_gates(resources, kernel, arch):
    from bench.kernel_resources import KERNELS as VARIANTS, family
    from fastlora.kernels import configs
    rows = [r for r in resources if r["kernel"] == kernel and int(r["arch"]) == arch]
    fam = family(arch)
    for dtype in ("bf16", "fp32"):  # every config of the 2- and 4-byte lists, every variant
        for variant, (meta, *_) in VARIANTS[kernel][4].items():
            n_cfg = len(configs.configs_for(kernel, fam, ITEMSIZE[dtype], meta["BLOCK_R"], meta.get("ADD_DX", False),
                                              configs.is_dora(meta)))
            got = [r for r in rows if r["dtype"] == dtype and r["variant"] == variant]
            assert n_cfg and len(got) == n_cfg, f"{kernel} sm_{arch} {dtype} {variant}: {len(got)} of {n_cfg} compiled"
    for r in rows:
        where = f"{kernel} sm_{arch} {r['dtype']} {r['variant']} {r['config']} w{r['num_warps']} s{r['num_stages']}"
        assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, \
            f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B"
        assert int(r["shared"]) <= int(r["shared_limit"]), f"{where}: {r['shared']} B of shared memory"
        want = int(r["intended_ctas"]) if r["variant"] == "even" and r["dtype"] in ("bf16", "fp16") else 1
        assert int(r["ctas_per_sm"]) >= want, f"{where}: {r['ctas_per_sm']} CTAs/SM, the config is meant for {want}"
        assert int(r["scalar_loads"]) <= 2, f"{where}: {r['scalar_loads']} scalar 8/16-bit global loads"
        if int(r["streamed"]):
            assert int(r["loop_async_copies"]) > 0, f"{where}: the main loop copies nothing asynchronously"
            allowed = _rmw_allowance(r) if r["variant"].startswith("hybrid") else 0
            assert int(r["loop_sync_loads"]) <= allowed, \
                f"{where}: {r['loop_sync_loads']} synchronous global loads in a loop (allowed {allowed})"
        if r["dtype"] in ("bf16", "fp16"):
            assert int(r["wgmma"]) + int(r["mma"]) > 0, f"{where}: no tensor-core instruction"
            if arch == 90 and kernel in GEMM_KERNELS:  # wgmma is Hopper's; sm_120 has mma only
                assert int(r["wgmma"]) > 0, f"{where}: Hopper GEMM without wgmma"


@pytest.mark.compile_only
@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
def test_dequant_kernels_pass_the_sass_gates(resources, arch):
    """QLoRA's dequantization kernels (kernels/dequant.py) are bandwidth-bound: no spills, every
    store a 16-byte vector (the tile's rows are 8 consecutive outputs), the packed codes read as
    32-bit words (int8 weights as 16-byte vectors), byte loads only for the double-quantized
    absmax codes (one per row of 8 outputs: at most 2 per thread)."""
    from bench.kernel_resources import DEQUANT_KERNELS, KERNELS as VARIANTS
    for kernel in DEQUANT_KERNELS:
        rows = [r for r in resources if r["kernel"] == kernel and int(r["arch"]) == arch]
        assert len(rows) >= 2 * len(VARIANTS[kernel][4]), f"{kernel} sm_{arch}: {len(rows)} compiled"
        for r in rows:
            where = f"{kernel} sm_{arch} {r['dtype']} {r['variant']}"
            assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, where
            assert int(r["scalar_stores"]) == 0 and int(r["vector_stores"]) > 0, \
                f"{where}: {r['scalar_stores']} scalar / {r['vector_stores']} 16-byte stores"
            allowed = 2 if r["variant"].startswith("nested") else 0
            assert int(r["scalar_loads"]) <= allowed, f"{where}: {r['scalar_loads']} scalar 8/16-bit loads"
            if kernel == "dequant_int8":
                assert int(r["vector_loads"]) > 0, f"{where}: int8 weights not read as 16-byte vectors"


@pytest.mark.compile_only
@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
def test_dora_kernels_pass_the_sass_gates(resources, arch):
    """DoRA's kernels (kernels/dora.py), bandwidth-bound, each at its one launch config: no spills,
    shared memory within the limit, no scalar 8/16-bit loads. The row norm streams W through its
    K loop asynchronously with no synchronous load left in the loop (every rank up to
    ``MAX_ONE_R``, row-major and Conv1D-transposed W), on tensor cores for 16-bit weights; only the
    ``chunked`` variant (r > MAX_ONE_R, r in 16-wide chunks inside each K step, so the K loop is not
    the innermost one) reads W synchronously. The dy pass reads dy and z and writes dz as 16-byte
    vectors."""
    from bench.kernel_resources import DORA_KERNELS, KERNELS as VARIANTS
    for kernel in DORA_KERNELS:
        rows = [r for r in resources if r["kernel"] == kernel and int(r["arch"]) == arch]
        for dtype in ("bf16", "fp32"):
            got = {r["variant"] for r in rows if r["dtype"] == dtype}
            assert got == set(VARIANTS[kernel][4]), f"{kernel} sm_{arch} {dtype}: compiled {sorted(got)}"
        for r in rows:
            where = f"{kernel} sm_{arch} {r['dtype']} {r['variant']}"
            assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, \
                f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B"
            assert int(r["shared"]) <= int(r["shared_limit"]), f"{where}: {r['shared']} B of shared memory"
            assert int(r["scalar_loads"]) == 0, f"{where}: {r['scalar_loads']} scalar 8/16-bit loads"
            if kernel == "dora_norm":
                assert int(r["loop_async_copies"]) > 0, f"{where}: W not copied asynchronously"
                if r["variant"] != "chunked":
                    assert int(r["loop_sync_loads"]) == 0, f"{where}: {r['loop_sync_loads']} synchronous loads in the K loop"
                if r["dtype"] in ("bf16", "fp16"):
                    assert int(r["wgmma"]) + int(r["mma"]) > 0, f"{where}: no tensor-core instruction"
            else:
                assert int(r["vector_loads"]) > 0 and int(r["vector_stores"]) > 0 and int(r["scalar_stores"]) == 0, \
                    f"{where}: {r['vector_loads']} 16-byte loads, {r['vector_stores']} 16-byte / {r['scalar_stores']} scalar stores"


def test_sass_parser_finds_loops_and_counts_loads():
    """The counters the gates rely on, on a hand-written SASS excerpt (cuobjdump's format)."""
    from bench.kernel_resources import sass_counts
    sass = """
        /*0000*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R8.64], P0 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0040*/                   LDG.E.64 R10, desc[UR4][R12.64] ;
        /*0050*/              @!P1 BRA 0x20 ;
        /*0060*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0068*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*006c*/                   STG.E.U16 desc[UR4][R2.64], R5 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
    """
    c = sass_counts(sass)
    assert c == dict(scalar_loads=1, loop_sync_loads=1, async_copies=1, loop_async_copies=1, tma_loads=0,
                     wgmma=1, mma=1, vector_loads=1, vector_stores=1, scalar_stores=1), c
