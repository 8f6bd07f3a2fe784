"""The dropout keep-mask on the CPU at native speed: a small C kernel (fastlora/csrc/philox_keep.c).

The CPU path of :func:`fastlora.lora_linear` needs the mask in the forward and the backward. In
torch ops, Philox4x32-10 with int64 emulation costs ~7 ns per element (more than torch's own
dropout); the C loop, one Philox call per 8 columns giving those columns' byte of the bit-packed
mask, costs ~0.4 ns per element on 2 cores. The forward builds the packed mask once (M·K/8
bytes: 1/32 of an fp32 input) and keeps it for the backward; the elementwise steps that need
it (``keep ⊙ x``, ``dx += α·keep ⊙ t``) read it in fused C loops for fp32, or unpack it to a 0 / 1
tensor for torch ops otherwise.

The kernel is compiled on first use with the system's C compiler (``$CC``, else ``cc`` /
``gcc`` / ``clang``; ``-O3 -fopenmp``, no ``-march=native`` so a shared cache stays portable) into
the cache directory of :mod:`fastlora.dispatch` (``~/.cache/fastlora``), keyed by the source and
the compiler, and loaded with ctypes; it uses ``torch.get_num_threads()`` threads. Without a
working compiler (or with ``FASTLORA_NO_CPU_KERNEL=1``) torch ops build the same bits, slower,
after one warning.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "philox_keep.c")
_LOCK = threading.Lock()
_STATE = {"lib": None, "tried": False}


def _compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _build():
    """Compile (or reuse the cached build of) the C kernel; returns the loaded library."""
    from .dispatch import cache_dir
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    with open(_SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC"]
    tag = hashlib.sha256(source + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"philox_keep-{tag}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        proc = subprocess.run([cc, *flags, _SOURCE, "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # atomic: concurrent processes (DDP ranks) never see half a file
    lib = ctypes.CDLL(path)
    i64, u32, ptr, nt = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int
    lib.fastlora_keep_packed.argtypes = [ptr, i64, i64, i64, u32, u32, u32, nt]
    lib.fastlora_packed_mul_f32.argtypes = [ptr, ptr, ptr, i64, i64, i64, nt]
    lib.fastlora_packed_addcmul_f32.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, nt]
    lib.fastlora_packed_to_f32.argtypes = [ptr, ptr, i64, i64, nt]
    return lib


def library():
    """The loaded C kernel, or None (no compiler, a failed build, or ``FASTLORA_NO_CPU_KERNEL=1``)."""
    if _STATE["tried"]:
        return _STATE["lib"]
    with _LOCK:
        if not _STATE["tried"]:
            try:
                _STATE["lib"] = None if os.environ.get("FASTLORA_NO_CPU_KERNEL", "0") == "1" else _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                warnings.warn(f"fastlora: the CPU dropout-mask kernel could not be built ({e}); using torch ops "
                              "instead (same masks, slower)", stacklevel=3)
            _STATE["tried"] = True
    return _STATE["lib"]


def packed_keep_c(M, K, seed, keep_thresh, row0=0):
    """The keep-mask of rows ``row0 .. row0 + M`` for the unsigned 64-bit ``seed``, bit-packed by
    the C kernel: uint8 ``[M, ceil(K / 8)]`` on the CPU, bit b of byte g = column 8g + b (1 =
    kept); None when the kernel is unavailable (fastlora.dropout.packed_keep then uses torch ops)."""
    lib = library()
    if lib is None:
        return None
    G = -(-K // 8)
    out = torch.empty((M, G), dtype=torch.uint8)
    if M and G:
        lib.fastlora_keep_packed(out.data_ptr(), M, G, row0, seed & 0xFFFFFFFF, seed >> 32, keep_thresh,
                                 torch.get_num_threads())
    return out


def unpack(packed, K, dtype=torch.float32):
    """A packed mask ``[M, G]`` as 0 / 1 ``[M, K]`` in ``dtype``."""
    M = packed.shape[0]
    lib = library()
    if lib is not None and packed.is_contiguous():
        out = torch.empty((M, K), dtype=torch.float32)
        if M and K:
            lib.fastlora_packed_to_f32(out.data_ptr(), packed.data_ptr(), M, K, torch.get_num_threads())
        return out.to(dtype)
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.view(M, -1)[:, :K].to(dtype)


def _rows_ok(t):
    """fp32 CPU ``[M, K]`` tensor with contiguous rows (what the fused C loops read)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1)


def packed_mul(x, packed):
    """``keep ⊙ x`` for fp32 ``[M, K]`` x with contiguous rows, in one fused pass; None when the C
    kernel or this layout is unavailable."""
    lib = library()
    if lib is None or not (_rows_ok(x) and packed.is_contiguous()):
        return None
    M, K = x.shape
    out = torch.empty((M, K), dtype=torch.float32)
    if M and K:
        lib.fastlora_packed_mul_f32(out.data_ptr(), x.data_ptr(), packed.data_ptr(), M, K, x.stride(0),
                                    torch.get_num_threads())
    return out


def packed_addcmul_(dx, t, packed, alpha):
    """``dx += alpha · keep ⊙ t`` in place for contiguous fp32 ``[M, K]`` dx and t, in one fused pass;
    returns False (nothing done) when the C kernel or this layout is unavailable."""
    lib = library()
    if lib is None or not (_rows_ok(dx) and dx.is_contiguous() and _rows_ok(t) and t.is_contiguous()
                           and packed.is_contiguous()):
        return False
    M, K = dx.shape
    if M and K:
        lib.fastlora_packed_addcmul_f32(dx.data_ptr(), t.data_ptr(), packed.data_ptr(), M, K, alpha,
                                        torch.get_num_threads())
    return True
