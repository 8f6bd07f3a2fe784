"""Compile-only checks of every shipped kernel config, for sm_80, sm_86, sm_90 and sm_120, on the CPU.

No GPU needed (FIELD.md §4): ``bench/kernel_resources.py`` compiles each config in its heaviest
and its lightest variant for each architecture and dtype; this test asserts zero register spills (``ptxas -v``),
shared memory within the architecture's per-block limit, and tensor-core instructions for
16-bit operands (``wgmma`` for the GEMM kernels on sm_90).

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
KERNELS = ("shrink", "fwd", "bwd_dy", "bwd_dx", "bwd_da")
GEMM_KERNELS = ("fwd", "bwd_dx")
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


@pytest.mark.compile_only
@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_shipped_config_compiles_without_spills(resources, kernel, arch):
    from fastlora.kernels import configs
    rows = [r for r in resources if r["kernel"] == kernel and int(r["arch"]) == arch]
    fam = configs.arch_of((arch // 10, arch % 10))
    for dtype in ("bf16", "fp32"):  # every config of the 2- and 4-byte lists, both variants
        n_cfg = len(configs.configs_for(kernel, fam, {"bf16": 2, "fp32": 4}[dtype]))
        got = [r for r in rows if r["dtype"] == dtype]
        assert n_cfg and len(got) == 2 * n_cfg, f"{kernel} sm_{arch} {dtype}: {len(got)} of {2 * n_cfg} compiled"
    for r in rows:
        where = f"{kernel} sm_{arch} {r['dtype']} {r['variant']} {r['config']} w{r['num_warps']} s{r['num_stages']}"
        assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, \
            f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B"
        assert int(r["shared"]) <= int(r["shared_limit"]), f"{where}: {r['shared']} B of shared memory"
        if r["dtype"] in ("bf16", "fp16"):
            assert r["wgmma"] == "True" or r["mma_sync"] == "True", f"{where}: no tensor-core instruction"
            if arch == 90 and kernel in GEMM_KERNELS:  # wgmma is Hopper's; sm_120 has mma only
                assert r["wgmma"] == "True", f"{where}: Hopper GEMM without wgmma"
