import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def _import_triton_for_the_interpreter():
    """Triton picks interpreter or GPU mode once, when it is first imported. Without a GPU, import it
    here, before any test module (or library) imports it normally, in interpreter mode, so that
    tests/test_triton_ops.py can run the Triton kernels on the CPU; then restore the environment."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        import clipfast.ops.triton  # noqa: F401
    except ImportError:
        pass  # test_triton_ops.py skips and says why
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


if not torch.cuda.is_available():
    _import_triton_for_the_interpreter()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
