"""The source checkout's layout against what else is installed.

The checkout's ``kernels/`` directory (installed as ``fastlora.kernels``) is also the top-level
package ``kernels`` whenever the checkout's root is on sys.path (pytest's ``pythonpath = .``,
``python -m bench`` from the root). Hugging Face's ``kernels`` distribution has that name too, and
transformers >= 5.25 imports it at ``import peft``/``import transformers.modeling_utils``."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import json, os, sys
import kernels
import fastlora.kernels as fk
print(json.dumps({"kernels": os.path.abspath(kernels.__file__), "fastlora.kernels": os.path.abspath(fk.__file__),
                  "paths": list(fk.PATHS), "hub": getattr(kernels, "__version__", None)}))
"""


def _probe(code):
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_top_level_kernels_is_the_installed_distribution_when_there_is_one():
    found = json.loads(_probe(PROBE).strip().splitlines()[-1])
    ours = os.path.join(ROOT, "kernels", "__init__.py")
    assert found["fastlora.kernels"] == ours and found["paths"] == ["fused", "hybrid"]
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        # nothing else is called `kernels`: the name resolves to the checkout's package, as before
        assert found["kernels"] == ours
        return
    assert not found["kernels"].startswith(os.path.join(ROOT, "kernels") + os.sep), found
    assert found["hub"] == version


def test_transformers_and_peft_import_from_the_checkout_root():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    # the import that failed with "cannot import name 'CUDAProperties' from 'kernels'" (transformers 5.25)
    assert _probe("import peft, transformers.modeling_utils; import fastlora.peft; print('ok')").split()[-1] == "ok"
