"""Shared fixtures. The whole suite runs in float32 and float64 with matching tolerances."""
from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

import kdna_fx
from kdna_fx.testing import output_tensors

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Random examples on every run (not derandomised: CI keeps exploring). print_blob makes a failure print the
# @reproduce_failure(...) line that replays it; `pytest --hypothesis-seed=N` replays a whole session.
settings.register_profile("kdna", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", deadline=None, max_examples=300, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kdna"))

# rtol/atol per dtype: float64 proves the algebra, float32 shows the tolerance users will see.
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request):
    """Runs the test once per dtype with that dtype as torch's default (models are built in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a shared 2-core machine two threads only fight."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def free_traced_models():
    """Collect garbage after the test. A traced model is a reference cycle (GraphModule <-> its graph), which
    only the cyclic collector frees, and it runs on object counts, not bytes: in a sweep of large models,
    several 600 M-parameter models piled up (23 GB, the suite killed for memory on the 24 GB machine)."""
    yield
    gc.collect()


class ModelSweep:
    """What the three model sweeps (torchvision classifiers, timm families, dense prediction) ask of each model:
    shared (finite gradients, fewer parameters) or listed as unchanged with its reason. A model whose outcome
    changes fails in either direction, so the lists stay true."""

    @staticmethod
    def transform(model: nn.Module) -> tuple[nn.Module, bool]:
        """kdna_fx.transform(model), and whether it left the model unchanged (NoEligibleConvWarning)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kmodel = kdna_fx.transform(model)
        return kmodel, any(issubclass(w.category, kdna_fx.NoEligibleConvWarning) for w in caught)

    @staticmethod
    def check(name: str, model: nn.Module, kmodel: nn.Module, unchanged: bool, listed: dict[str, str]) -> None:
        """After a backward pass through ``kmodel``: finite gradients, and the outcome ``listed`` promises."""
        grads = [p.grad for p in kmodel.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        before, after = (sum(p.numel() for p in m.parameters()) for m in (model, kmodel))
        if name in listed:
            assert unchanged, f"{name} is listed as unchanged ({listed[name]}) but kdna_fx now shares it"
            assert after == before
        else:
            assert not unchanged, f"{name}: kdna_fx found nothing to share; list it in UNCHANGED with a reason"
            assert after < before


    @staticmethod
    def reloads(kmodel: nn.Module, x: object, folder, **kwargs: object) -> None:
        """kdna_fx.save then kdna_fx.load(path), with no model given (the file records how its model was built:
        build it with kdna_fx.models.create_model), computes bit for bit what ``kmodel`` computes on ``x`` (and
        ``kwargs``), in eval mode: every output tensor, for models that return dicts or lists too."""
        path = folder / "model.safetensors"
        kdna_fx.save(kmodel, path)
        again = kdna_fx.load(path)
        with torch.no_grad():
            ours, theirs = (output_tensors(m.eval()(x, **kwargs)) for m in (again, kmodel))
        assert ours and len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.fixture
def model_sweep() -> ModelSweep:
    return ModelSweep()


@pytest.fixture
def tol(dtype):
    return TOLERANCES[dtype]


# ---- test tiers (README, Tests) ------------------------------------------------------------------------------------
# make test-fast: the unit tier (`not integration`, under 2 minutes); make test (CI, the default of a bare pytest):
# everything but the full model sweeps, bench smoke runs and slow checks; make test-all: everything.
# Files whose every test belongs to a tier, with the reason it is not in the faster one:
FILE_TIERS = {
    "test_speed_suite.py": ("bench", "runs bench/speed.py end to end"),
    "test_frontier_study.py": ("bench", "runs the frontier study's scripts on tiny settings"),
    "test_gpu_check.py": ("bench", "dry-runs bench/gpu_check.py (the GPU machine's script) on the CPU"),
    "test_train.py": ("integration", "trains models for a few steps, kdna train and eval end to end"),
    "test_distributed.py": ("integration", "spawns DDP processes"),
    "test_compiled_training.py": ("integration", "compiles training steps with Inductor"),
    "test_compile.py": ("integration", "torch.compile in train and eval mode"),
    "test_deploy.py": ("integration", "torch.export, ONNX and Inductor freezing of zoo models"),
    "test_conversion.py": ("integration", "converts and calibrates trained models"),
    "test_convert_command.py": ("integration", "kdna train then kdna convert end to end"),
    "test_calibrate.py": ("integration", "calibration runs"),
    "test_scenes.py": ("integration", "builds and trains on generated scenes"),
    "test_swap.py": ("integration", "third-party-like models through the module swap, compiled and exported"),
    "test_zoo_api.py": ("integration", "compile, export and full-size equality checks of every zoo model"),
    "test_export.py": ("integration", "ONNX and pt2 exports checked in onnxruntime and torch.export"),
    "test_timm_zoo.py": ("integration", "the zoo through timm, smp and a torchvision detector"),
    "test_zoo_sweep.py": ("integration", "every torchvision classifier (the full list: marker sweep)"),
    "test_dense_sweep.py": ("integration", "torchvision detection, segmentation, flow and video models"),
    "test_timm_sweep.py": ("integration", "one model per timm family"),
    "test_thirdparty_sweep.py": ("integration", "smp, MONAI, Ultralytics, transformers, efficientnet-pytorch"),
}


# The model sweeps run a sample of cheap models of each kind in the default tier (9 torchvision classifiers) (the rest are marked `sweep`);
# tests/test_thirdparty_sweep.py (the libraries users bring: smp, MONAI, Ultralytics, Hugging Face, ...) runs whole but for two models in SLOW_TESTS whose path a sibling checks.
SWEEP_SAMPLES = {
    "test_zoo_sweep.py": {"resnet18", "squeezenet1_1", "googlenet", "swin_v2_t", "mobilenet_v3_large",
                          "inception_v3", "shufflenet_v2_x0_5", "regnet_y_400mf", "efficientnet_b0"},
    "test_timm_sweep.py": {"convnext_atto", "resnet10t", "mobilevit_xxs", "regnetx_002", "densenet121",
                           "levit_128s", "resnest14d", "vgg11_bn"},
    "test_dense_sweep.py": {"raft_small", "r3d_18", "s3d", "swin3d_t", "lraspp_mobilenet_v3_large",
                            "deeplabv3_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
                            "ssdlite320_mobilenet_v3_large"},
}


# Single tests moved out of the default tier (to make test-all), each with the reason (durations measured on the quiet
# 2-core machine, 2026-12-06): a cheaper sibling in the default tier checks the same mechanism.
SLOW_TESTS = {
    **{f"test_zoo_api.py::test_compile_does_not_recompile_across_batch_sizes[{n}]":
       "resnet18.kdna checks the same (no recompile across batch sizes) in 4 s; these take 4-12 s each"
       for n in ("convnext_tiny.kdna", "mobilenet_v2.kdna", "mobilenet_v2_050.kdna", "resnet50.kdna")},
    **{f"test_compile.py::{t}": "Inductor in float64: the float32 twin compiles the same graph (2.6 s each)"
       for t in ("test_compiled_fullgraph_matches_eager[fp64-train]", "test_compiled_fullgraph_matches_eager[fp64-eval]",
                 "test_folded_model_compiles_and_matches[fp64]")},
    "test_peers.py::test_kernelwarehouse_traces_and_compiles_without_recompiling_on_temperature[fp64]":
        "the fp32 twin compiles the same graph (7 s each)",
    **{f"test_deploy.py::test_peer_compiles_fullgraph_without_recompiles[{n}]":
       "ODConv checks the peers' compile path; each peer takes 2-5 s" for n in ("condconv", "dyconv", "kernelwarehouse")},
    **{f"test_export.py::test_a_peer_exports_to_onnx_at_a_dynamic_batch[{n}]":
       "ODConv checks the peers' ONNX form (it has every attention); each takes about 8 s" for n in ("condconv", "kernelwarehouse")},
    **{f"test_zoo_api.py::test_torch_export_with_a_dynamic_batch[{n}.kdna]":
       "resnet18.kdna and mobilenet_v2.kdna check the capture here, bench/export_check.py every zoo name at 224 px "
       "(2-3 s each)" for n in ("convnext_tiny", "resnet50", "mobilenet_v2_050")},
    **{f"test_timm_zoo.py::{t}[kdna_{a}_{p}]": "the peer tags go through the same timm path as plain, replace, "
       "relaxed and kdna, which stay in the default tier (about 0.3 s each, 40 in all)"
       for t in ("test_features_only", "test_timm_builds_what_create_model_builds")
       for a in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v2_050", "convnext_tiny")
       for p in ("condconv", "dyconv", "odconv", "kernelwarehouse")},
    "test_thirdparty_sweep.py::test_a_library_model_is_shared_or_unchanged_and_never_wrong"
    "[tv-fasterrcnn-mobilenet_v3_large_320_fpn]": "tv-fasterrcnn-resnet18-fpn checks torchvision's detection path (4 s)",
    **{f"test_thirdparty_sweep.py::test_a_library_model_is_shared_or_unchanged_and_never_wrong[{n}]":
       "large 3-D networks (20-60 s each on 2 cores); monai-unet-3d, -segresnet-3d, -basicunet-3d and the dense "
       "sweep's r3d_18 and s3d keep 3-D in the default tier"
       for n in ("tv-r3d_18", "tv-mc3_18", "tv-r2plus1d_18", "tv-s3d", "monai-swinunetr-3d")},
    "test_thirdparty_sweep.py::test_a_library_model_is_shared_or_unchanged_and_never_wrong[smp-unetplusplus-resnet18]":
        "smp's Unet, FPN and DeepLabV3+ on the same encoder stay in the default tier (4 s)",
    **{f"test_metadata_travels.py::test_kdna_fx_metadata_travels_with_the_model[{kind}-{a}-deepcopy-{b}-deepcopy]":
       "pickle then deepcopy, and the two mixed sequences, stay in the default tier for every model; the other "
       "pickle / torch.save pairings repeat them (0.2 s each)"
       for kind in ("graph", "swap", "folded", "folded-swap", "peer", "peer-swap", "zoo", "as_function")
       for a, b in (("pickle", "torch.save"), ("torch.save", "pickle"), ("torch.save", "torch.save"))},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = FILE_TIERS.get(item.path.name)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier[0]))
        if f"{item.path.name}::{item.name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        sample = SWEEP_SAMPLES.get(item.path.name)
        name = getattr(item, "callspec", None) and item.callspec.params.get("name")
        if sample is not None and name is not None and name not in sample:
            item.add_marker(pytest.mark.sweep)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json from the current code")


def pytest_report_header(config):
    """Which hypothesis profile and seed this session runs with (printed at the top of every run)."""
    seed = config.getoption("--hypothesis-seed", default=None)
    current = settings.default
    how = (f"seed {seed} (--hypothesis-seed)" if seed is not None else
           "derandomized" if current.derandomize else "random seed per test (a failure prints how to replay it)")
    name = settings.get_current_profile_name()
    more = "" if name == "thorough" else "; HYPOTHESIS_PROFILE=thorough for more examples"
    return f"hypothesis profile {name!r}: max_examples={current.max_examples}, {how}{more}"
