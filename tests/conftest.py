import os

# A missing or mismatched clipfast._C is an error here, not a warning (clipfast/ops/extension.py).
os.environ.setdefault("CLIPFAST_REQUIRE_EXTENSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def _import_triton_for_the_interpreter():
    """Triton picks interpreter or GPU mode once, when it is first imported. Without a GPU, import it
    here, before any test module (or library) imports it normally, in interpreter mode, so that the
    op tests' triton cases (tests/optest.py) can run the Triton kernels on the CPU; then restore the
    environment."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        import clipfast.ops.triton  # noqa: F401
    except ImportError:
        pass  # the triton cases skip and say why (optest.WHY_NOT)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


if not torch.cuda.is_available():
    _import_triton_for_the_interpreter()


@pytest.fixture(autouse=True)
def _triton_interpreter_env(request, monkeypatch):
    """Every `triton`-marked test runs with TRITON_INTERPRET=1 where there is no GPU (optest.py)."""
    if request.node.get_closest_marker("triton") is not None:
        from optest import use_triton_interpreter

        use_triton_interpreter(monkeypatch)


# A tiny CLIP with a BadNet backdoor (4x4 patch, bottom-right corner, target "heart"), trained once
# per test session (~1 minute on 2 cores) for the end-to-end and scale-out tests.
def _poisoned_recipe():
    from clipfast.recipes import WorldRecipe
    from clipfast.train import TrainConfig

    return WorldRecipe(attack="badnet", rate=0.02, train_size=8_000, seed=1,
                       train=TrainConfig(steps=500, batch_size=128, lr=2e-3, eval_every=0, progress=False))


POISONED_RECIPE = _poisoned_recipe()
PROBE = 3_000  # the first PROBE poisoned training pairs are the probe set


@pytest.fixture(scope="session")
def poisoned_world(tmp_path_factory):
    """(bundle, training pairs, run directory holding model.pt)."""
    from clipfast.recipes import train_world_model

    run_dir = tmp_path_factory.mktemp("poisoned")
    bundle, _, pairs = train_world_model(POISONED_RECIPE, run_dir)
    return bundle, pairs, run_dir


# CLIPFAST_REQUIRE_GPU=1 (scripts/gpu_check.py sets it on the GPU machine): a gpu- or triton-marked
# test that skips, for whatever reason, fails instead, so that a GPU run cannot pass by skipping. Tests
# marked multigpu (they need two GPUs) are exempt; without any GPU the whole run stops at once.
REQUIRE_GPU_ENV = "CLIPFAST_REQUIRE_GPU"


def _require_gpu() -> bool:
    return os.environ.get(REQUIRE_GPU_ENV) == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    if _require_gpu() and any("gpu" in item.keywords or "triton" in item.keywords for item in items):
        pytest.exit(f"{REQUIRE_GPU_ENV}=1 but torch sees no CUDA GPU: the gpu and triton tests would only skip",
                    returncode=3)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and _require_gpu() and not hasattr(report, "wasxfail")
            and ("gpu" in item.keywords or "triton" in item.keywords) and "multigpu" not in item.keywords):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_GPU_ENV}=1: this GPU test skipped ({reason}); on the GPU machine that is a failure"
