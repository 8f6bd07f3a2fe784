"""Static cost model of every kernel of both fastlora paths, the frozen base and eager PEFT.

A reviewer without a GPU can check the design against it; the benchmark prints it next to its
measurements. Nothing here is measured: each kernel's floor is the largest of

    DRAM bytes / BANDWIDTH,  tensor-core FLOPs / TENSOR_FLOPS,  ALU instructions / ALU_RATE,

with the dropout mask's Philox regeneration as ALU work (~13 integer instructions per element:
one Philox4x32-10 call, ~100 instructions, per 8 elements) and L2-resident traffic (per-tile
re-reads of W, S, A, B; atomics) left out of DRAM bytes (atomics are listed apart). Defaults:
H200 (FIELD.md §3: ~4.3 TB/s measured DRAM, ~790 TFLOP/s dense bf16, 132 SMs × 4 schedulers ×
32 lanes × 1.98 GHz ≈ 33 T lane-instructions/s). fp32 LoRA math on a 16-bit model (PEFT's default
fp32 adapters, outside autocast) costs 3 MMAs per LoRA product in the streaming kernels (the exact
operand split) and 6 MMA-equivalents in the GEMM epilogues (tf32x3 at half the bf16 rate); the
LoRA side is memory-bound, so this shows up only where the FLOPs column says so.

    python -m bench.model [--sets llama3-8b] [--tokens 8192] [--rank 16] [--dropout 0.1] [--fp32-lora]
"""
import argparse
import dataclasses

from . import shapes as S

BANDWIDTH = 4.3e12  # bytes/s
TENSOR_FLOPS = 790e12  # dense bf16/fp16
ALU_RATE = 33e12  # lane-instructions/s
PHILOX_PER_ELEMENT = 13


@dataclasses.dataclass
class Kernel:
    name: str
    dram_bytes: float
    flops: float
    alu: float = 0.0
    atomic_bytes: float = 0.0

    def floor_us(self, bw=BANDWIDTH, tflops=TENSOR_FLOPS, alu=ALU_RATE):
        return 1e6 * max(self.dram_bytes / bw, self.flops / tflops, self.alu / alu)

    def bound(self, bw=BANDWIDTH, tflops=TENSOR_FLOPS, alu=ALU_RATE):
        t = {"bytes": self.dram_bytes / bw, "MMA": self.flops / tflops, "ALU": self.alu / alu}
        return max(t, key=t.get)


def kernels(M, N, K, r, p, e=2, fp32_lora=False, block_m=64, block_m_dy=64):
    """``{path: [Kernel]}`` for one layer: base, fused, hybrid, eager (PEFT's order)."""
    a = 4 if fp32_lora else e  # adapter bytes
    split = 3 if fp32_lora else 1  # MMAs per LoRA product (streaming kernels)
    epi = 6 if fp32_lora else 1  # MMA-equivalents per LoRA product (GEMM epilogues: tf32x3)
    mask = PHILOX_PER_ELEMENT * M * K if p > 0 else 0
    s_bytes = 4 * M * r
    gemm = 2 * M * N * K
    base = [Kernel("x·Wᵀ", e * (M * K + N * K + M * N), gemm), Kernel("dy·W", e * (M * N + N * K + M * K), gemm)]
    shrink = Kernel("F1 shrink", e * M * K + a * r * K + s_bytes, split * 2 * M * K * r, mask)
    b1 = Kernel("B1 dS, dB", e * M * N + a * N * r + 2 * s_bytes, split * 4 * M * N * r,
                atomic_bytes=4 * N * r * (M // block_m_dy))
    slabs = max(1, -(-2 * 132 // -(-K // 64)))  # B3's row slabs: ~2 programs per SM over 64-wide columns
    b3 = Kernel("B3 dA", e * M * K + s_bytes, split * 2 * M * K * r, mask, atomic_bytes=4 * r * K * slabs)
    fused = [shrink, Kernel("F2 GEMM + (s·S)·Bᵀ", e * (M * K + N * K + M * N) + s_bytes + a * N * r,
                            gemm + epi * 2 * M * N * r),
             b1, Kernel("B2 dy·W + m⊙(dS·A)", e * (M * N + N * K + M * K) + s_bytes + a * r * K,
                        gemm + epi * 2 * M * K * r, mask), b3]
    hybrid = [shrink, Kernel("cuBLAS x·Wᵀ + b", e * (M * K + N * K + M * N), gemm),
              Kernel("H1 y += (s·S)·Bᵀ", 2 * e * M * N + s_bytes + a * N * r, epi * 2 * M * N * r),
              b1, Kernel("cuBLAS dy·W", e * (M * N + N * K + M * K), gemm),
              Kernel("B3 dA + dx += m⊙(dS·A)", 3 * e * M * K + s_bytes + a * r * K,
                     split * 2 * M * K * r + epi * 2 * M * K * r, mask, atomic_bytes=4 * r * K * slabs)]
    mk = M * K * e
    eager = [Kernel("x·Wᵀ", e * (M * K + N * K + M * N), gemm),
             Kernel("dropout (x̃, mask)", 2 * mk + M * K, 0, 2 * M * K if p > 0 else 0),
             Kernel("x̃·Aᵀ", mk + 2 * e * M * r, 2 * M * K * r), Kernel("S·Bᵀ", 2 * e * M * r + e * M * N, 2 * M * N * r),
             Kernel("·s, + base", 4 * e * M * N, 0),
             Kernel("dy·W", e * (M * N + N * K + M * K), gemm), Kernel("·s (grad)", 2 * e * M * N, 0),
             Kernel("dS = g·B, dB", 2 * e * M * N + 2 * e * M * r, 4 * M * N * r),
             Kernel("dx̃ = dS·A, dA", mk + 2 * e * M * r + mk, 4 * M * K * r),
             Kernel("dropout bwd (mask)", 2 * mk + M * K, 0), Kernel("dx sum", 3 * mk, 0)]
    if p == 0:
        eager = [k for k in eager if not k.name.startswith("dropout")]
    return {"base": base, "fused": fused, "hybrid": hybrid, "eager": eager}


def total_us(ks, **kw):
    return sum(k.floor_us(**kw) for k in ks)


def report(M, N, K, r, p, e=2, fp32_lora=False, name="", detail=True):
    """Printable lines: per-kernel bytes, FLOPs, floor and bound; path totals and ratios to base."""
    paths = kernels(M, N, K, r, p, e, fp32_lora)
    base = total_us(paths["base"])
    lines = [f"{name} M={M} K={K} N={N} r={r} p={p} {'fp32 LoRA' if fp32_lora else f'{8 * e}-bit'}: "
             + ", ".join(f"{k} {total_us(v):.1f} us ({total_us(v) / base:.3f}x base)" for k, v in paths.items())]
    if detail:
        for path in ("fused", "hybrid"):
            for k in paths[path]:
                lines.append(f"    {path:6} {k.name:26} {k.dram_bytes / 1e6:9.1f} MB {k.flops / 1e9:9.1f} GFLOP "
                             f"{k.alu / 1e9:7.2f} Ginstr {k.floor_us():8.1f} us ({k.bound()}-bound)"
                             + (f"  atomics {k.atomic_bytes / 1e6:.1f} MB (L2)" if k.atomic_bytes else ""))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["llama3-8b"], choices=sorted(S.SHAPE_SETS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--fp32-lora", action="store_true", help="PEFT's default fp32 adapters on a bf16 model")
    ap.add_argument("--brief", action="store_true", help="totals only")
    args = ap.parse_args(argv)
    print(f"static model (not measured): {BANDWIDTH / 1e12:.1f} TB/s, {TENSOR_FLOPS / 1e12:.0f} TFLOP/s, "
          f"{ALU_RATE / 1e12:.0f} T ALU instr/s, Philox {PHILOX_PER_ELEMENT} instr/element")
    for set_name in args.sets:
        for layer, K, N in S.unique_layers(set_name):
            for M in args.tokens:
                for line in report(M, N, K, args.rank, args.dropout, fp32_lora=args.fp32_lora, name=layer,
                                   detail=not args.brief):
                    print(line)


if __name__ == "__main__":
    main()
