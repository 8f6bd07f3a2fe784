"""The dropout mask: Philox bits, its torch twin, statistics, seeding and reproducibility."""
import pytest
import torch

from _lora_testing import HAS_CUDA, INTERPRETED, backends, fastlora, make_inputs, run
from fastlora.dropout import check_seed, keep_bits, keep_params, philox4x32


def test_philox_known_answers():
    """Random123's published Philox4x32-10 known-answer vectors (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in cases:
        out = philox4x32(*[torch.tensor([c], dtype=torch.int64) for c in ctr], *key)
        assert tuple(int(o) for o in out) == expected


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs the Triton interpreter or a GPU")
def test_torch_philox_equals_triton_randint4x():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(seed, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N).to(tl.int64)
        # a 64-bit counter whose high word (the row, in fastlora's layout) is large
        w0, w1, w2, w3 = tl.randint4x(seed, (i * 104729 + 7) | ((i * 7919 + 65537) << 32))
        tl.store(out_ptr + i * 4 + 0, w0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 1, w1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 2, w2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 3, w3.to(tl.int64) & 0xFFFFFFFF)

    device = "cuda" if HAS_CUDA and not INTERPRETED else "cpu"
    seed = 0x0123456789ABCDEF
    out = torch.empty(64 * 4, dtype=torch.int64, device=device)
    kernel[(1,)](seed, out, 64)
    i = torch.arange(64, dtype=torch.int64)
    zero = torch.zeros_like(i)
    ref = torch.stack(philox4x32(i * 104729 + 7, i * 7919 + 65537, zero, zero, seed & 0xFFFFFFFF, seed >> 32), -1)
    assert torch.equal(out.cpu(), ref.reshape(-1))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_mask_statistics(p):
    """Keep rate within 5σ of 1-p overall and for each of the 8 lanes of a Philox call, inverted
    scaling (mean ≈ 1), and no correlation between neighbours along K or M."""
    M, K = 512, 1024
    mask = fastlora.dropout_mask((M, K), p, seed=2024)
    keep = (mask > 0).double()
    q = 1 - p
    n = keep.numel()
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(keep.mean().item() - q) < 5 * sigma
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / q
    assert torch.all((mask == 0) | (mask == torch.tensor(1 / (1 - p), dtype=torch.float32)))
    lane_sigma = (q * (1 - q) / (n / 8)) ** 0.5
    for lane in range(8):
        assert abs(keep[:, lane::8].mean().item() - q) < 5 * lane_sigma, f"lane {lane}"
    centred = keep - keep.mean()
    for name, a, b in (("along K", centred[:, 1:], centred[:, :-1]), ("along M", centred[1:], centred[:-1])):
        corr = (a * b).mean() / centred.pow(2).mean()
        assert abs(corr.item()) < 5 / (a.numel() ** 0.5), f"correlated {name}: {corr.item():.4f}"


def test_keep_threshold_quantisation():
    for p in (0.0001, 0.1, 1 / 3, 0.5, 0.999):
        thresh, scale = keep_params(p)
        assert abs(thresh / 65536 - (1 - p)) <= 0.5 / 65536
        assert scale == pytest.approx(1 / (1 - p), rel=1e-7)


def test_mask_is_a_function_of_the_flattened_row_and_column():
    a = fastlora.dropout_mask((2, 3, 21), 0.3, seed=5)
    b = fastlora.dropout_mask((6, 21), 0.3, seed=5)
    assert torch.equal(a.reshape(6, 21), b)
    # a prefix of the columns does not depend on K (the counter is (k // 8, m))
    assert torch.equal(fastlora.dropout_mask((6, 40), 0.3, seed=5)[:, :21], b)
    # and the row count does not change earlier rows; a row window is a slice of the whole
    assert torch.equal(fastlora.dropout_mask((9, 21), 0.3, seed=5)[:6], b)
    thresh, _ = keep_params(0.3)
    assert torch.equal(keep_bits(4, 21, 5, thresh, row0=3), keep_bits(9, 21, 5, thresh)[3:7])


def test_seeds_are_64_bit_unsigned():
    assert check_seed(-1) == 2 ** 64 - 1
    assert torch.equal(keep_bits(4, 16, -1, 30000), keep_bits(4, 16, 2 ** 64 - 1, 30000))
    assert not torch.equal(keep_bits(4, 64, 1, 30000), keep_bits(4, 64, 1 + 2 ** 32, 30000))


@pytest.mark.parametrize("backend,device", backends())
def test_same_seed_is_bitwise_reproducible(backend, device):
    x, W, A, B, b, dy = make_inputs(37, 45, 70, 12, torch.float32, device)
    outs = []
    for _ in range(2):
        xg, Ag, Bg = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
        y = run(backend, fastlora.lora_linear, xg, W, Ag, Bg, 2.0, b, dropout_p=0.3, seed=77)
        y.backward(dy)
        outs.append((y, xg.grad, Ag.grad, Bg.grad))
    for name, u, v in zip(("y", "dx", "dA", "dB"), *outs):
        assert torch.equal(u, v), f"{name} differs between two runs with the same seed"
    y3 = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.3, seed=78)
    assert not torch.equal(y3, outs[0][0])


@pytest.mark.parametrize("backend,device", backends())
def test_tensor_seed_equals_int_seed(backend, device):
    x, W, A, B, b, _ = make_inputs(20, 24, 40, 4, torch.float32, device)
    for seed in (5, -3, 2 ** 64 - 7):
        as_tensor = torch.tensor([seed - 2 ** 64 if seed >= 2 ** 63 else seed], device=device)
        y_int = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.5, seed=seed)
        y_t = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.5, seed=as_tensor)
        assert torch.equal(y_int, y_t)


@pytest.mark.parametrize("backend,device", backends())
def test_seed_none_follows_torch_manual_seed(backend, device):
    x, W, A, B, b, _ = make_inputs(20, 24, 40, 4, torch.float32, device)

    def f():
        return run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.5)

    torch.manual_seed(123)
    y1, y2 = f(), f()
    torch.manual_seed(123)
    y3 = f()
    assert torch.equal(y1, y3)
    assert not torch.equal(y1, y2), "two calls drew the same seed"


@pytest.mark.parametrize("backend,device", backends())
def test_no_dropout_in_eval_or_at_p0(backend, device):
    x, W, A, B, b, _ = make_inputs(20, 24, 40, 4, torch.float32, device)
    plain = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b)
    evald = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.5, training=False, seed=1)
    assert torch.equal(plain, evald)
    train = run(backend, fastlora.lora_linear, x, W, A, B, 2.0, b, dropout_p=0.5, seed=1)
    assert not torch.equal(plain, train)
