"""torch.compile on transformed models: fullgraph, equal to eager, no recompiles on batch-size changes."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import kdna_fx
from kdna_fx.testing import OneFamily, TinyResNet, randomize_adapters

# Tier integration: make test-fast leaves it out (torch.compile in train and eval mode).
pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(TinyResNet(width=4))
    randomize_adapters(kmodel)
    return kmodel


# aot_eager: dynamo's capture, AOT autograd's functionalisation and decompositions, in both dtypes and modes.
# Inductor's C++ build of a transformed model (about 1 s a kernel here) is test_functional_nd's compile test, at
# every rank, on the smallest model with a family (OneFamily); TinyResNet's kernels would add none of ours.
# The float64 twins are make test-all's: the float32 runs capture the same graphs.
FP32_FIRST = pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)],
                                     ids=["fp32", "fp64"], indirect=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
@FP32_FIRST
def test_compiled_fullgraph_matches_eager(dtype, tol, mode):
    kmodel = _model().train(mode == "train")
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(kmodel, backend="aot_eager", fullgraph=True)
    if mode == "train":
        # Train mode updates BatchNorm running stats: compare on identical copies of the model.
        import copy
        eager_model = copy.deepcopy(kmodel)
        # Not out.sum(): its gradient is constant over batch and space, which a train-mode BatchNorm removes
        # exactly, so the weight gradients before one are pure float32 cancellation noise.
        out_c, out_e = compiled(x), eager_model(x)
        out_c.square().sum().backward()
        out_e.square().sum().backward()
        torch.testing.assert_close(out_c, out_e, **tol)
        for (name, p), (_, q) in zip(kmodel.named_parameters(), eager_model.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")
    else:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), kmodel(x), **tol)


@FP32_FIRST
def test_folded_model_compiles_and_matches(dtype, tol):
    # The folded model is plain modules: what is ours is that it captures as one graph and computes what it did,
    # which aot_eager checks; Inductor's C++ build of plain convs (about 35 s here) would test torch.
    folded = kdna_fx.fold(_model().eval())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(folded, backend="aot_eager", fullgraph=True)(x), folded(x), **tol)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_size_change_does_not_recompile_once_batch_is_dynamic(mode):
    kmodel = _model().train(mode == "train")
    counter = CompileCounter()
    compiled = torch.compile(kmodel, backend=counter, fullgraph=True)
    for batch in (2, 3, 5, 8):
        x = torch.randn(batch, 3, 16, 16)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(x)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 4 batch sizes"


def test_static_batch_would_recompile_so_the_counter_can_fail():
    counter = CompileCounter()
    torch.manual_seed(0)
    compiled = torch.compile(kdna_fx.transform(OneFamily()).eval(), backend=counter, fullgraph=True, dynamic=False)
    for batch in (2, 3):
        compiled(torch.randn(batch, 3, 16, 16))
    assert counter.frame_count == 2
