"""Bad input: a clear TypeError / ValueError naming the argument, raised before any launch,
with every tensor left unchanged."""
import pytest
import torch

from _lora_testing import backends, fastlora, run
from fastlora.kernels import LAUNCH_COUNTS


def good():
    torch.manual_seed(0)
    return dict(input=torch.randn(5, 8), weight=torch.randn(6, 8), lora_A=torch.randn(3, 8),
                lora_B=torch.randn(6, 3), scaling=2.0, bias=torch.randn(6))


def meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# (id, change to the good arguments, keyword arguments, exception, words the message must hold)
CASES = [
    ("input-not-tensor", lambda a: a.update(input=[[1.0] * 8]), {}, TypeError, ["input", "list"]),
    ("input-int", lambda a: a.update(input=a["input"].long()), {}, TypeError, ["input", "int64"]),
    ("input-complex", lambda a: a.update(input=a["input"].to(torch.complex64)), {}, TypeError, ["input", "complex64"]),
    ("input-0d", lambda a: a.update(input=torch.tensor(1.0)), {}, ValueError, ["input", "0-D"]),
    ("K-zero", lambda a: a.update(input=torch.randn(5, 0), weight=torch.randn(6, 0), lora_A=torch.randn(3, 0)),
     {}, ValueError, ["input", "K"]),
    ("weight-1d", lambda a: a.update(weight=torch.randn(48)), {}, ValueError, ["weight", "2-D", "(48,)"]),
    ("weight-K", lambda a: a.update(weight=torch.randn(6, 9)), {}, ValueError, ["weight", "(6, 9)", "8"]),
    ("weight-dtype", lambda a: a.update(weight=a["weight"].half()), {}, TypeError, ["weight", "float16", "float32"]),
    ("weight-int", lambda a: a.update(weight=a["weight"].int()), {}, TypeError, ["weight", "int32"]),
    ("lora_A-K", lambda a: a.update(lora_A=torch.randn(3, 7)), {}, ValueError, ["lora_A", "(3, 7)"]),
    ("lora_A-r0", lambda a: a.update(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), {}, ValueError,
     ["lora_A", "r >= 1"]),
    ("lora_A-3d", lambda a: a.update(lora_A=torch.randn(1, 3, 8)), {}, ValueError, ["lora_A", "2-D"]),
    ("lora_A-int", lambda a: a.update(lora_A=a["lora_A"].long()), {}, TypeError, ["lora_A", "int64"]),
    ("lora_B-N", lambda a: a.update(lora_B=torch.randn(5, 3)), {}, ValueError, ["lora_B", "[6, 3]", "(5, 3)"]),
    ("lora_B-r", lambda a: a.update(lora_B=torch.randn(6, 4)), {}, ValueError, ["lora_B", "[6, 3]", "(6, 4)"]),
    ("bias-shape", lambda a: a.update(bias=torch.randn(7)), {}, ValueError, ["bias", "[6]", "(7,)"]),
    ("bias-dtype", lambda a: a.update(bias=a["bias"].double()), {}, TypeError, ["bias", "float64"]),
    ("bias-int", lambda a: a.update(bias=a["bias"].long()), {}, TypeError, ["bias", "int64"]),
    ("weight-device", lambda a: a.update(weight=meta(a["weight"])), {}, ValueError, ["weight", "meta", "cpu"]),
    ("lora_B-device", lambda a: a.update(lora_B=meta(a["lora_B"])), {}, ValueError, ["lora_B", "meta"]),
    ("scaling-nan", lambda a: a.update(scaling=float("nan")), {}, ValueError, ["scaling", "nan"]),
    ("scaling-inf", lambda a: a.update(scaling=float("inf")), {}, ValueError, ["scaling", "inf"]),
    ("scaling-str", lambda a: a.update(scaling="2"), {}, TypeError, ["scaling", "str"]),
    ("scaling-bool", lambda a: a.update(scaling=True), {}, TypeError, ["scaling", "bool"]),
    ("scaling-None", lambda a: a.update(scaling=None), {}, TypeError, ["scaling", "NoneType"]),
    ("scaling-learnable", lambda a: a.update(scaling=torch.tensor(2.0, requires_grad=True)), {}, ValueError,
     ["scaling", "requires grad"]),
    ("scaling-int-tensor", lambda a: a.update(scaling=torch.tensor(2)), {}, TypeError, ["scaling", "int64"]),
    ("scaling-two-values", lambda a: a.update(scaling=torch.ones(2)), {}, TypeError, ["scaling", "(2,)"]),
    ("scaling-device", lambda a: a.update(scaling=torch.empty(1, device="meta")), {}, ValueError,
     ["scaling", "meta"]),
    ("p-one", lambda a: None, {"dropout_p": 1.0}, ValueError, ["dropout_p", "[0, 1)", "1.0"]),
    ("p-negative", lambda a: None, {"dropout_p": -0.1}, ValueError, ["dropout_p", "-0.1"]),
    ("p-nan", lambda a: None, {"dropout_p": float("nan")}, ValueError, ["dropout_p", "nan"]),
    ("p-str", lambda a: None, {"dropout_p": "0.1"}, TypeError, ["dropout_p", "str"]),
    ("p-invalid-in-eval", lambda a: None, {"dropout_p": 1.5, "training": False}, ValueError, ["dropout_p"]),
    ("seed-float", lambda a: None, {"dropout_p": 0.1, "seed": 1.5}, TypeError, ["seed", "float"]),
    ("seed-too-big", lambda a: None, {"dropout_p": 0.1, "seed": 2 ** 64}, ValueError, ["seed", "2**64"]),
    ("seed-bool", lambda a: None, {"dropout_p": 0.1, "seed": True}, TypeError, ["seed", "bool"]),
    ("seed-float-tensor", lambda a: None, {"dropout_p": 0.1, "seed": torch.tensor([1.0])}, TypeError,
     ["seed", "float32"]),
]


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly_and_changes_nothing(backend, device, case):
    _, change, kwargs, exc, words = case
    args = good()
    change(args)
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            args[k] = v.to(device)
            if v.is_floating_point():
                args[k].requires_grad_()
    before = {k: v.detach().clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    launches = sum(LAUNCH_COUNTS.values())
    with pytest.raises(exc) as info:
        run(backend, fastlora.lora_linear, **args, **kwargs)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} lacks {w!r}"
    assert sum(LAUNCH_COUNTS.values()) == launches, "a kernel was launched before the error"
    for k, v in before.items():
        assert torch.equal(args[k].detach(), v), f"{k} was modified"
        assert args[k].grad is None


def test_function_apply_validates_too():
    a = good()
    with pytest.raises(ValueError, match="lora_B"):
        fastlora.LoRALinearFunction.apply(a["input"], a["weight"], a["lora_A"], torch.randn(5, 3), 1.0)
    with pytest.raises(TypeError, match="seed"):
        fastlora.LoRALinearFunction.apply(a["input"], a["weight"], a["lora_A"], a["lora_B"], 1.0, None, 0.1,
                                          torch.tensor([1.0]))


def test_dropout_mask_validates():
    with pytest.raises(ValueError, match="dropout_p"):
        fastlora.dropout_mask((4, 8), 1.0, 0)
    with pytest.raises(TypeError, match="seed"):
        fastlora.dropout_mask((4, 8), 0.1, "0")
    with pytest.raises(ValueError, match="shape"):
        fastlora.dropout_mask((), 0.1, 0)
