"""Sibling LoRA layers fed one input (q/k/v, gate/up) as one group: one autograd node, one dx.

Math, for G siblings j = 1..G reading the same ``x [M, K]``, each with its own ``W_j [N_j, K]``,
``A_j [r_j, K]``, ``B_j [N_j, r_j]``, scaling ``s_j``, bias ``b_j`` and dropout ``p_j`` (PEFT
draws an independent mask per layer, and so does a group: ``m_j`` comes from sibling j's own
seed, drawn in the order the layers run)::

    S_j  = (m_j ⊙ x)·A_jᵀ                 y_j = x·W_jᵀ + b_j + s_j·S_j·B_jᵀ        (each y_j its own tensor)
    dS_j = s_j·dy_j·B_j     dB_j = s_j·dy_jᵀ·S_j     dA_j = dS_jᵀ·(m_j ⊙ x)       db_j = Σ_M dy_j
    dx   = Σ_j dy_j·W_j + m_j ⊙ (dS_j·A_j)            one [M, K] buffer

Ungrouped, autograd sums G separate ``[M, K]`` dx tensors; here every sibling's dx is added into
one buffer as it is computed (torch path: ``addmm_`` with beta = 1 for ``dy_j·W_j``, the LoRA term
added in place; Triton hybrid path: cuBLAS accumulating into the buffer and B3 adding the LoRA
term; Triton fused path: B2 writes dx_j, added into the buffer). Saved for backward: the input
once, each sibling's parameters (no copies), ``S_j [M, r_j]`` and its seed (the torch path on a
CPU: its bit-packed mask), exactly what G ungrouped calls save, minus G - 1 references to x.

Each sibling's forward runs the ops it runs alone, with the seed it would draw alone, so y_j,
dA_j, dB_j and db_j are bitwise those of the ungrouped layers on the torch path; dx differs only
by the order of the sum (fp32 rounding).

Not yet here (issue #25): the grouped Triton kernels (one read of x for every sibling's shrink,
one dx accumulator over all siblings' N). The forward still reads x once per sibling.

Discovery (:class:`SiblingGroups`): layers of a patched model report each fused call; calls that
follow each other with the same input tensor (same object, same ``_version``) and no generator
draw in between form a chain, and a chain seen at the end of a forward becomes a group for the
next one: its first layer (the head) computes the whole group and hands the others their
outputs, which each of them takes only if it is called with that same tensor and the same
parameters (object, ``_version``), scaling, dropout and mode, and the generator stands where the
head predicted its seed (the random stream is the ungrouped one, :class:`SiblingGroups`);
otherwise it computes alone and the group is dropped until seen again.
"""
import collections
import weakref

import torch
from torch.autograd.function import once_differentiable

from ._checks import autocast_enabled, check_inputs
from .function import _Call, _forward, grads
from .dropout import draw_seed
from .functional import _autocast_cast, _check_call, lora_linear


class Sibling(collections.namedtuple("Sibling", "weight lora_A lora_B scaling bias dropout_p seed",
                                     defaults=(1.0, None, 0.0, None))):
    """One member of a group: the arguments :func:`fastlora.lora_linear` takes after ``input``
    (``weight [N, K]``, ``lora_A [r, K]``, ``lora_B [N, r]``, ``scaling``, ``bias [N]`` or None,
    ``dropout_p``, ``seed``; see there)."""


def _plain_context(device_type):
    """Whether an eager autograd call can run as one group node now: grad mode on, no
    torch.compile / torch.func transform / forward-mode AD / TorchScript trace, and no saved-tensor
    default hooks (non-reentrant activation checkpointing, ``save_on_cpu``: their recomputation
    must see the same nodes as the forward, so grouped calls there stay per layer)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from . import ops
    from .function import _forward_mode_ad
    if ops.need_operator() or _forward_mode_ad():
        return False
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is None


class _GroupedFunction(torch.autograd.Function):
    """The group's autograd node: ``apply(input, calls, seeds, *tensors)`` with ``tensors`` the
    siblings' ``(weight, lora_A, lora_B, bias)`` in order; returns one y per sibling."""

    @staticmethod
    def forward(ctx, input, calls, seeds, *tensors):
        ys, saved, metas = [], [input], []
        for j, c in enumerate(calls):
            weight, lora_A, lora_B, bias = tensors[4 * j: 4 * j + 4]
            y, S, seed_t, mask = _forward(c, input, weight, lora_A, lora_B, bias, seeds[j], empty_seed=False)
            ys.append(y)
            meta = _Meta(c, bias)
            meta.has_seed, meta.has_scale = seed_t is not None, c.scale is not None
            saved += [weight, lora_A, lora_B, S, mask, *(t for t in (seed_t, c.scale) if t is not None)]
            metas.append(meta)
        ctx.metas = metas
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*saved)
        return tuple(ys)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        input, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        K = input.shape[-1]
        x = input if input.dim() == 2 else input.reshape(-1, K)
        dx, out = None, [None, None, None]
        for j, (meta, dy) in enumerate(zip(ctx.metas, dys)):
            n = 5 + meta.has_seed + meta.has_scale
            weight, lora_A, lora_B, S, mask, *rest = saved[:n]
            saved = saved[n:]
            nw, na, nb, nbias = need[3 + 4 * j: 7 + 4 * j]
            if dy is None:  # y_j did not reach the loss
                out += [None] * 4
                continue
            seed_t = rest.pop(0) if meta.has_seed else None
            scale = rest.pop(0) if meta.has_scale else None
            dxj, dW, dA, dB, db = grads(meta, dy, x, weight, lora_A, lora_B, S, mask, seed_t, scale, need[0], nw, na,
                                        nb, nbias, dx_out=dx)
            if dxj is not None:
                dx = dxj
            out += [dW, dA, dB, db]
        if dx is None and need[0]:  # no sibling's output reached the loss
            dx = torch.zeros_like(x)
        out[0] = None if dx is None else (dx if input.dim() == 2 else dx.view(input.shape))
        return tuple(out)


class _Meta:
    """A sibling's constants for :func:`fastlora.function.grads` (what ``_save`` puts on a ctx)."""
    __slots__ = ("scaling", "keep", "backend", "lora_dtype", "bias_dtype", "has_seed", "has_scale")

    def __init__(self, c, bias):
        self.scaling, self.keep, self.backend, self.lora_dtype = c.scaling, (c.keep_thresh, c.keep_scale), \
            c.backend, c.lora_dtype
        self.bias_dtype = None if bias is None else bias.dtype


def _member_error(j, e):
    return type(e)(f"siblings[{j}]: {e}")


def grouped_lora_linear(input, siblings, *, training=True):
    """Several LoRA linears reading the same ``input`` (q/k/v, gate/up), as one autograd node.

    ``[lora_linear(input, *s, training=training) for s in siblings]``, with one dx buffer in the
    backward (see the module doc for the math); each output is its own tensor.

    Args:
        input: ``[..., K]`` as for :func:`fastlora.lora_linear`.
        siblings: a non-empty sequence of :class:`Sibling` (or tuples in its field order:
            ``weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None``), each
            checked as :func:`fastlora.lora_linear` checks its arguments; they may differ in N, r,
            scaling, bias, dropout and adapter dtype.
        training: apply each sibling's dropout.

    Returns:
        a tuple of ``[..., N_j]`` tensors, in input's dtype (the autocast dtype under autocast).

    Seeds: a sibling with ``seed=None`` and dropout draws its seed when its turn comes, in the
    siblings' order, as the ungrouped calls would: the masks, outputs and LoRA gradients are
    those of the ungrouped calls (bitwise on the torch path), dx up to the order of its sum.

    Where one node cannot be built (no gradient needed, ``torch.compile``, ``torch.func``
    transforms, forward-mode AD, ``torch.jit.trace``, saved-tensor hooks such as non-reentrant
    activation checkpointing, a quantized weight), the siblings run one by one through
    :func:`fastlora.lora_linear`, in order: the same results.

    Raises:
        TypeError / ValueError: as :func:`fastlora.lora_linear`, the message prefixed with
            ``siblings[j]``; an empty ``siblings``. Nothing is computed before all are checked.
    """
    if not isinstance(siblings, (list, tuple)) or not siblings:
        raise ValueError(f"siblings: expected a non-empty list of Sibling, got {siblings!r}")
    try:
        siblings = [s if isinstance(s, Sibling) else Sibling(*s) for s in siblings]
    except TypeError as e:
        raise TypeError(f"siblings: each must be a Sibling or a tuple of its fields ({e})") from None
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    device_type = input.device.type
    autocast = autocast_enabled(device_type)
    plain = _plain_context(device_type) and all(type(s.weight) in (torch.Tensor, torch.nn.Parameter)
                                                 for s in siblings)
    if not plain:  # checked by lora_linear itself, all before any is computed
        for j, s in enumerate(siblings):
            _check_sibling(j, input, s, autocast, training)
        return tuple(lora_linear(input, s.weight, s.lora_A, s.lora_B, s.scaling, s.bias, dropout_p=s.dropout_p,
                                 training=training, seed=s.seed) for s in siblings)
    calls = []
    lora_dtype = torch.get_autocast_dtype(device_type) if autocast else None
    x = _autocast_cast(input, lora_dtype) if autocast else input
    tensors = []
    for j, s in enumerate(siblings):
        shapes, p = _check_sibling(j, input, s, autocast, training)
        weight, bias = (_autocast_cast(s.weight, lora_dtype), _autocast_cast(s.bias, lora_dtype)) if autocast else \
            (s.weight, s.bias)
        try:
            calls.append(_Call(x, weight, s.lora_A, s.lora_B, s.scaling, bias, p, lora_dtype,
                               None if autocast else shapes, resolve=True))
        except (TypeError, ValueError) as e:
            raise _member_error(j, e) from None
        tensors += [weight, s.lora_A, s.lora_B, bias]
    with torch.autocast(device_type, enabled=False) if autocast else _NULL:
        return _GroupedFunction.apply(x, calls, [s.seed for s in siblings], *tensors)


def explain_grouped_path(input, siblings, *, training=True):
    """How :func:`grouped_lora_linear` runs these siblings, and why; nothing is launched or timed.

    Args: as :func:`grouped_lora_linear`.

    Returns:
        a list of strings, one per line: the first says whether the call is one group node
        (and if not, why every sibling runs alone), then ``siblings[j]: <PathInfo>`` with each
        sibling's backend and forward / backward path (:func:`fastlora.explain_path`; a grouped
        backward accumulates every sibling's dx into one ``[M, K]`` buffer on that path).

    Raises:
        TypeError / ValueError: as :func:`grouped_lora_linear`.
    """
    from .dispatch import explain_path
    if not isinstance(siblings, (list, tuple)) or not siblings:
        raise ValueError(f"siblings: expected a non-empty list of Sibling, got {siblings!r}")
    siblings = [s if isinstance(s, Sibling) else Sibling(*s) for s in siblings]
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    device_type = input.device.type
    autocast = autocast_enabled(device_type)
    for j, s in enumerate(siblings):
        _check_sibling(j, input, s, autocast, training)
    if not torch.is_grad_enabled():
        head = "per layer: grad mode is off (no backward, so no shared dx)"
    elif not _plain_context(device_type):
        head = ("per layer: torch.compile, a torch.func transform, forward-mode AD, torch.jit.trace or "
                "saved-tensor hooks (non-reentrant checkpointing) are active")
    elif not all(type(s.weight) in (torch.Tensor, torch.nn.Parameter) for s in siblings):
        head = "per layer: a quantized weight"
    else:
        head = (f"one autograd node for {len(siblings)} siblings: each forward on its own path, "
                "every dx accumulated into one [M, K] buffer")
    lines = [head]
    for j, s in enumerate(siblings):
        if type(s.weight) not in (torch.Tensor, torch.nn.Parameter):
            lines.append(f"siblings[{j}]: quantized weight ({type(s.weight).__name__}), as fastlora.lora_linear runs it")
            continue
        try:
            info = explain_path(input, s.weight, s.lora_A, s.lora_B, s.bias, dropout_p=s.dropout_p, training=training)
        except (TypeError, ValueError) as e:
            raise _member_error(j, e) from None
        lines.append(f"siblings[{j}]: {info}")
    return lines


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def _check_sibling(j, input, s, autocast, training):
    """:func:`fastlora.lora_linear`'s checks of one sibling: ``((M, N, K, r), dropout_p in effect)``."""
    try:
        if type(s.weight) not in (torch.Tensor, torch.nn.Parameter):
            return None, _check_call(input, s.scaling, s.dropout_p, training, s.seed)
        shapes = check_inputs(input, s.weight, s.lora_A, s.lora_B, s.bias, same_dtype=not autocast)
        return shapes, _check_call(input, s.scaling, s.dropout_p, training, s.seed)
    except (TypeError, ValueError) as e:
        raise _member_error(j, e) from None


# ------------------------------------------------------------------------------------------
# Discovery: which layers of a model are siblings
# ------------------------------------------------------------------------------------------
class _Generators:
    """The default generator of a device, and a clone of it that draws the seeds the siblings
    still to come will draw, without moving the generator itself."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.main = torch.cuda.default_generators[index]
        else:
            self.main = torch.default_generator
        self.clone = torch.Generator(device=device)
        self.clone.set_state(self.main.get_state())

    def mark(self, gen=None):
        """A comparable snapshot of a generator's state (the clone by default)."""
        return _mark(self.clone if gen is None else gen, self.device)

    def draw(self):
        """The seed the main generator will give the next :func:`fastlora.dropout.draw_seed`."""
        return torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=self.device,
                             generator=self.clone)


def _mark(gen, device):
    if device.type == "cuda":  # host-side integers: no synchronisation
        return (gen.initial_seed(), gen.get_offset())
    return gen.get_state()


def _main_mark(device):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _mark(torch.cuda.default_generators[index], device)
    return _mark(torch.default_generator, device)


def _same_mark(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


class _Pending:
    """A sibling's output computed by its head: taken if the sibling is called with the same
    input at the same version, the same key, and (if it draws a dropout seed) the generator where
    the head predicted it (``rng``: the state before its draw)."""
    __slots__ = ("x", "version", "key", "y", "head", "rng")

    def __init__(self, x, key, y, head, rng):
        self.x, self.version, self.key, self.y, self.head, self.rng = weakref.ref(x), x._version, key, y, head, rng


class SiblingGroups:
    """The sibling groups of one model, learned from its calls (see the module doc), and the
    outputs a group's head computed for the layers still to come.

    A layer takes part through :meth:`run`; it must offer ``_fastlora_group_args(x)`` returning
    ``(key, Sibling)`` for a call with input ``x`` (``key``: everything the call's result depends on
    besides x's value, :func:`key_of`), or None when that call would not run fused. ``enabled=False``
    (or ``FASTLORA_GROUP=0`` when the model was patched) turns grouping off.

    The random stream is the ungrouped one: the head draws its own seed, predicts its siblings'
    from a clone of the generator, and each sibling draws its own seed from the generator when
    its call comes, taking the head's output only if the generator is where the head predicted
    (anything drawn in between: it computes alone with the seed it drew). So grouping never moves
    a mask, also across activation-checkpoint recomputation.

    Attributes:
        enabled: whether groups run.
        counts: ``Counter`` of "grouped" (head calls that computed a group), "handed" (siblings
            that took the output their head computed) and "dropped" (handed outputs not taken:
            the sibling was called with another input or in another state, something drew random
            numbers before it, or it did not run).
    """

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.links = {}  # head layer -> (head, sibling, ...): learned
        self.counts = collections.Counter()
        self._chain = []
        self._last = None  # (weakref(x), x._version) of the last call
        self._pending = {}
        self._pending_x = None

    def __reduce__(self):  # copies and pickles start afresh (weak references, outputs in flight)
        return (SiblingGroups, (self.enabled,))

    def groups(self):
        """The learned groups as tuples of layers, head first."""
        return list(self.links.values())

    def reset(self):
        """Forget the learned groups and any output in flight."""
        self.links.clear()
        self._chain, self._last = [], None
        self._drop_pending()

    def _drop_pending(self):
        self.counts["dropped"] += len(self._pending)
        self._pending.clear()
        self._pending_x = None

    def _finish_chain(self):
        chain = self._chain
        if chain:
            head = chain[0]
            for m in chain[1:]:
                self.links.pop(m, None)  # a sibling is nobody's head
            if len(chain) > 1:
                self.links[head] = tuple(chain)
            else:
                self.links.pop(head, None)
        self._chain = []

    def run(self, layer, x, key, sibling, alone):
        """``layer``'s output for input ``x``: handed over from its group's head, computed with its
        group, or ``alone()``; ``key`` / ``sibling``: what ``layer._fastlora_group_args(x)`` gives."""
        if not self.enabled or type(x) is not torch.Tensor or not _plain_context(x.device.type):
            self._finish_chain()
            self._last = None
            if self._pending:
                self._drop_pending()
            return alone()
        if self._pending:
            ent = self._pending.pop(layer, None)
            if ent is not None:
                rng_ok = ent.rng is None or _same_mark(ent.rng, _main_mark(x.device))
                if ent.x() is x and ent.version == x._version and same_key(ent.key, key) and self._chain \
                        and layer not in self._chain and rng_ok:
                    if ent.rng is not None:
                        draw_seed(x.device)  # the draw this call makes alone: the stream moves as ungrouped
                    self.counts["handed"] += 1
                    self._chain.append(layer)
                    return ent.y
                self.counts["dropped"] += 1
                self.links.pop(ent.head, None)  # relearned from the calls as they come
            if self._pending and (self._pending_x is None or self._pending_x() is not x):
                self._drop_pending()
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version and layer not in self._chain:
            self._chain.append(layer)
            return self._alone(x, alone)
        self._finish_chain()
        self._chain = [layer]
        group = self.links.get(layer)
        if group is None:
            return self._alone(x, alone)
        plan = []
        for m in group[1:]:
            args = m._fastlora_group_args(x)
            if args is None:  # would not run fused (or we cannot tell what it draws): the group ends here
                break
            plan.append((m, args, _pre_hooked(m)))
        if not any(not hooked for _, _, hooked in plan):
            return self._alone(x, alone)
        try:
            for j, s in enumerate([sibling] + [a[1] for _, a, _ in plan]):  # checked before any seed is drawn
                _check_sibling(j, x, s, autocast_enabled(x.device.type), True)
        except (TypeError, ValueError):  # a sibling's state no longer fits x: each computes (and raises) alone
            self.links.pop(layer, None)
            return self._alone(x, alone)
        if sibling.dropout_p > 0 and sibling.seed is None:
            sibling = sibling._replace(seed=draw_seed(x.device))
        gens = _Generators(x.device)
        members, sibs, keys, marks = [], [], [], []
        for m, (key_m, s), hooked in plan:
            mark = None
            if s.dropout_p > 0 and s.seed is None:
                mark = gens.mark()
                s = s._replace(seed=gens.draw())
            if hooked:  # a forward pre-hook runs at its own call and may change its input: it computes alone
                continue  # (its seed was drawn on the clone: the siblings after it are predicted right)
            members.append(m)
            keys.append(key_m)
            sibs.append(s)
            marks.append(mark)
        ys = grouped_lora_linear(x, [sibling] + sibs, training=True)
        self._pending = {m: _Pending(x, k, y, layer, r) for m, k, y, r in zip(members, keys, ys[1:], marks)}
        self._pending_x = weakref.ref(x)
        self.counts["grouped"] += 1
        self._last = (weakref.ref(x), x._version)
        return ys[0]

    def _alone(self, x, alone):
        y = alone()
        self._last = (weakref.ref(x), x._version)
        return y


def _pre_hooked(layer):
    """Whether forward pre-hooks run before ``layer``'s forward (they may change its input)."""
    return bool(layer._forward_pre_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def autocast_key(device_type):
    """The autocast state a call's key holds: ``(enabled, dtype)``, ``(False, None)`` outside
    autocast and on device types autocast does not know (``meta``)."""
    return (True, torch.get_autocast_dtype(device_type)) if autocast_enabled(device_type) else (False, None)


def key_of(tensors, constants):
    """A call's key for :func:`same_key`: each tensor (or None) with its ``_version``, then the
    constants (compared by ``==``)."""
    return tuple(tensors), tuple(None if t is None else t._version for t in tensors), tuple(constants)


def same_key(a, b):
    """Whether two :func:`key_of` keys name the same call: the same tensor objects at the same
    versions, equal constants."""
    return len(a[0]) == len(b[0]) and all(s is t for s, t in zip(a[0], b[0])) and a[1] == b[1] and a[2] == b[2]
