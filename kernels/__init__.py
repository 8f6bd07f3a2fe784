"""fastlora's Triton kernels (installed as ``fastlora.kernels``).

Knows nothing of nn.Module, autograd or PEFT: callers pass validated 2-D tensors.
``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run under
the Triton interpreter (Triton reads it when the kernels are decorated).

In a source checkout this directory is also reachable as the top-level package ``kernels``
whenever the checkout's root is on ``sys.path`` (``python -m`` from the root, pytest's
``pythonpath = .``, ``PYTHONPATH=.``), and there it shadows Hugging Face's ``kernels``
distribution, which transformers >= 5.25 requires and imports (``from kernels import
CUDAProperties, ...`` in ``transformers.integrations.hub_kernels``). Imported under that name,
this file hands the import over to the installed distribution when there is one, and is
fastlora's kernels package (as before) when there is none.
"""
import sys as _sys


def _installed_kernels_spec():
    """The spec of a ``kernels`` package found on sys.path outside this checkout, or None."""
    import importlib.machinery
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in _sys.path if os.path.abspath(p or os.curdir) != root]
    return importlib.machinery.PathFinder.find_spec("kernels", paths)


_other = _installed_kernels_spec() if __name__ == "kernels" else None
if _other is not None:
    import importlib.util as _util

    # The import system returns whatever sys.modules holds under the name once this file has run.
    _module = _util.module_from_spec(_other)
    _sys.modules["kernels"] = _module
    _other.loader.exec_module(_module)
else:
    from . import configs, dequant, dora
    from .launch import LAUNCH_COUNTS, is_interpreted
    from .lora_backward import dora_linear_bwd, lora_linear_bwd
    from .lora_forward import _lora_shrink_kernel, lora_linear_fwd

    INTERPRETED = is_interpreted(_lora_shrink_kernel)
    PATHS = ("fused", "hybrid")

    __all__ = ["dequant", "dora", "lora_linear_fwd", "lora_linear_bwd", "dora_linear_bwd", "LAUNCH_COUNTS", "INTERPRETED", "PATHS",
               "configs"]
