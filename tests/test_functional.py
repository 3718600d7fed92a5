"""Property tests of the pure adapter math (kdna_fx.functional)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.func import grad, vmap

from kdna_fx import functional as KF
from kdna_fx.peers import functional as PF
from kdna_fx.adapters import Gate, gate_width


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 2, 3]))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    padding = draw(st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"])))
    if padding == "same":
        stride = 1  # PyTorch allows 'same' only with stride 1
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    h, w = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    pads = KF.explicit_padding(k, padding, dilation)
    assume(h + pads[2] + pads[3] >= dilation * (k - 1) + 1 and w + pads[0] + pads[1] >= dilation * (k - 1) + 1)
    if mode == "reflect":
        assume(max(pads) < min(h, w))
    if mode == "circular":
        assume(max(pads) <= min(h, w))
    return dict(batch=draw(st.integers(1, 4)), cin=cin, cout=cout, k=k, h=h, w=w, groups=groups,
                conv=dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode),
                seed=draw(st.integers(0, 2**16)))


@given(conv_cases())
def test_gating_input_equals_per_sample_kernel(dtype, tol, case):
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], case["cin"], case["h"], case["w"], generator=g)
    weight = torch.randn(case["cout"], case["cin"] // case["groups"], case["k"], case["k"], generator=g)
    a = torch.rand(case["batch"], case["cin"], generator=g)
    gated = KF.conv(KF.scale_channels(x, a), weight, **case["conv"])

    def one_sample(xi, ai):  # the naive dynamic conv: its own kernel per sample
        return KF.conv(xi[None], KF.per_sample_kernel(weight, ai, case["groups"]), **case["conv"])[0]

    torch.testing.assert_close(gated, vmap(one_sample)(x, a), **tol)


@given(conv_cases())
def test_conv2d_matches_nn_conv2d_padding_modes(dtype, tol, case):
    g = torch.Generator().manual_seed(case["seed"])
    conv = torch.nn.Conv2d(case["cin"], case["cout"], case["k"], bias=True, **case["conv"])
    x = torch.randn(case["batch"], case["cin"], case["h"], case["w"], generator=g)
    ours = KF.conv(x, conv.weight, conv.bias, **case["conv"])
    torch.testing.assert_close(ours, conv(x), **tol)


@given(conv_cases())
def test_per_sample_conv_matmul_form_equals_grouped_form(dtype, tol, case):
    # The peers' per-sample convolution in its two forms (kdna_fx.export writes the matmul form to ONNX at a
    # dynamic batch): same numbers for every geometry and padding mode, each sample against its own kernel.
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], case["cin"], case["h"], case["w"], generator=g)
    weights = torch.randn(case["batch"], case["cout"], case["cin"] // case["groups"], case["k"], case["k"], generator=g)
    bias = torch.randn(case["batch"], case["cout"], generator=g)
    grouped = PF.per_sample_conv2d(x, weights, bias, **case["conv"])
    with PF.per_sample_form("matmul"):
        matmul = PF.per_sample_conv2d(x, weights, bias, **case["conv"])
    torch.testing.assert_close(matmul, grouped, **tol)
    one = KF.conv(x[:1], weights[0], bias[0], **case["conv"])
    torch.testing.assert_close(matmul[:1], one, **tol)


def test_per_sample_form_is_restored_and_checked():
    with pytest.raises(ValueError, match="'grouped' or 'matmul'"):
        with PF.per_sample_form("unfold"):
            pass
    with pytest.raises(RuntimeError):
        with PF.per_sample_form("matmul"):
            raise RuntimeError
    x, w = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3, 3)

    def ops() -> set[str]:
        with torch.profiler.profile() as prof:
            PF.per_sample_conv2d(x, w)
        return {e.key for e in prof.key_averages()}

    assert "aten::im2col" not in ops()  # the grouped form again after the block, even one left by an error
    with PF.per_sample_form("matmul"):
        assert "aten::im2col" in ops()


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_modulate_is_elementwise_product(dtype, tol, cout, cin, k, seed):
    g = torch.Generator().manual_seed(seed)
    p, f, s = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g), torch.randn(k, k, generator=g)
    expected = torch.empty_like(p)
    for o in range(cout):
        for i in range(cin):
            for u in range(k):
                for v in range(k):
                    expected[o, i, u, v] = p[o, i, u, v] * (1 + f[o]) * (1 + s[u, v])
    torch.testing.assert_close(KF.modulate(p, f, s), expected, **tol)
    torch.testing.assert_close(KF.modulate(p, None, None), p, **tol)


def test_modulate_with_zero_scales_is_the_parent(dtype):
    p = torch.randn(4, 3, 3, 3)
    assert torch.equal(KF.modulate(p, torch.zeros(4), torch.zeros(3, 3)), p)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_gate_shape_range_and_module_agrees_with_function(dtype, tol, norm):
    gate = Gate(6, reduction=4, norm=norm).eval()
    x = torch.randn(3, 6, 5, 5)
    a = gate(x)
    assert a.shape == (3, 6) and bool(((a > 0) & (a < 1)).all())
    h = gate.fc1(x.mean(dim=(2, 3)))
    h = gate.norm(h)
    torch.testing.assert_close(a, torch.sigmoid(gate.fc2(torch.relu(h))), **tol)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 64])
def test_gate_never_has_zero_width(channels):
    assert gate_width(channels, reduction=4) >= 1
    gate = Gate(channels, reduction=16, norm="layer")
    assert gate.fc1.out_features >= 1
    assert gate(torch.randn(2, channels, 3, 3)).shape == (2, channels)


def test_child_conv_gradients_match_the_naive_per_sample_formulation(dtype, tol):
    """Oracle: the same child written naively, one modulated and gated kernel per sample, each sample its
    own conv (broadcasting by hand, no einops, no kdna_fx op but per_sample_kernel). torch.func.grad of
    the kdna_fx form must equal autograd through the naive one, for the kernel, F, S and the gate."""
    x = torch.randn(3, 4, 6, 6)
    gate = Gate(4, norm="none")
    params = dict(parent=torch.randn(4, 4, 3, 3), f=torch.randn(4) * 0.1, s=torch.randn(3, 3) * 0.1,
                  fc2=gate.fc2.weight.detach().clone())

    def kdna(p):
        a = KF.gate(x, gate.fc1.weight, p["fc2"], gate.fc2.bias)
        y = KF.child_conv(x, p["parent"], filter_scale=p["f"], spatial_scale=p["s"], gate_values=a, padding=1)
        return (y ** 2).mean()

    def naive(p):
        a = torch.sigmoid(torch.relu(x.mean((2, 3)) @ gate.fc1.weight.T) @ p["fc2"].T + gate.fc2.bias)
        w = p["parent"] * (1 + p["f"]).view(-1, 1, 1, 1) * (1 + p["s"]).view(1, 1, 3, 3)
        y = torch.cat([torch.nn.functional.conv2d(x[b:b + 1], KF.per_sample_kernel(w, a[b]), padding=1)
                       for b in range(x.shape[0])])
        return (y ** 2).mean()

    func_grads = grad(kdna)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    naive(leaves).backward()
    for k in params:
        torch.testing.assert_close(func_grads[k], leaves[k].grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_under_bf16_autocast_runs_its_linears_in_the_weights_dtype(dtype):
    # A bf16 linear of one sample is slow on CPUs without AMX (docs/speed.md): the gate keeps its small MLP in the
    # weights' dtype under autocast and returns values in the activations' dtype, so the scaling stays in bf16.
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 5, dtype=dtype).to(torch.bfloat16)
    w1, w2, b2 = (torch.randn(2, 8, dtype=dtype), torch.randn(8, 2, dtype=dtype), torch.randn(8, dtype=dtype))
    seen = []

    def norm(h):
        seen.append(h.dtype)
        return h * 0.5

    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = KF.gate(x, w1, w2, b2, norm, scale=2.0)
    assert seen == [dtype] and a.dtype == torch.bfloat16
    # The same math as outside autocast, up to bf16's rounding of the mean and of the result.
    expected = KF.gate(x.to(dtype), w1, w2, b2, lambda h: h * 0.5, scale=2.0)
    torch.testing.assert_close(a.to(dtype), expected, atol=2e-2, rtol=0)
    assert KF.gate(x.to(dtype), w1, w2, b2, norm).dtype == dtype and seen[-1] == dtype  # no autocast: as before
