"""kdna_fx.peers: CondConv, DY-Conv and ODConv as transforms, checked against a naive per-sample loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdna_fx
from kdna_fx import peer_functional as PF
from kdna_fx.functional import explicit_padding
from kdna_fx.peers import CondConv2d, DynamicConv2d, ODConv2d, PeerConv2d
from kdna_fx.reporting import count_macs
from kdna_fx.testing import TinyResNet

pytestmark = pytest.mark.usefixtures("one_thread")

PEERS = {
    "condconv": lambda m, **kw: kdna_fx.peers.condconv(m, experts=3, **kw),
    "dyconv": lambda m, **kw: kdna_fx.peers.dyconv(m, kernels=3, temperature=2.0, **kw),
    "odconv1x": lambda m, **kw: kdna_fx.peers.odconv(m, kernel_num=1, temperature=1.5, **kw),
    "odconv3x": lambda m, **kw: kdna_fx.peers.odconv(m, kernel_num=3, **kw),
}
KERNELS = {"condconv": ("condconv", 3), "dyconv": ("dyconv", 3), "odconv1x": ("odconv", 1), "odconv3x": ("odconv", 3)}
WITH_DEPTHWISE = kdna_fx.KDNAConfig(depthwise=True)


class TwoConv(nn.Module):
    """Bias, stride, dilation, groups, reflect padding and a depthwise conv: every geometry the peers must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1, bias=True)
        self.b = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.c = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _randomise_heads(model: nn.Module) -> None:
    # Copy init zeroes CondConv's routing; random heads and statistics make every attention input-dependent.
    with torch.no_grad():
        for peer in (m for m in model.modules() if isinstance(m, PeerConv2d)):
            for name, p in peer.named_parameters():
                if name != "weight":
                    p.copy_(torch.randn_like(p) * 0.5)
            if isinstance(peer, ODConv2d):
                peer.bn.running_mean.normal_()
                peer.bn.running_var.uniform_(0.5, 2.0)


def _hand_attentions(peer: PeerConv2d, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The attentions of one sample x [C, H, W], written out from the papers' equations (eval mode)."""
    pooled = x.mean((1, 2))
    if isinstance(peer, CondConv2d):
        return {"kernel": torch.sigmoid(peer.routing.weight @ pooled + peer.routing.bias)}
    if isinstance(peer, DynamicConv2d):
        z = peer.fc2.weight @ torch.relu(peer.fc1.weight @ pooled) + peer.fc2.bias
        return {"kernel": torch.softmax(z / peer.temperature, dim=0)}
    bn = peer.bn
    h = (peer.fc.weight @ pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    h, t = torch.relu(h), peer.temperature
    heads = {"channel": peer.channel_fc, "filter": peer.filter_fc, "spatial": peer.spatial_fc}
    out = {k: torch.sigmoid((fc.weight @ h + fc.bias) / t) for k, fc in heads.items() if fc is not None}
    if peer.kernel_fc is not None:
        out["kernel"] = torch.softmax((peer.kernel_fc.weight @ h + peer.kernel_fc.bias) / t, dim=0)
    return out


def _naive(peer: PeerConv2d, x: torch.Tensor) -> torch.Tensor:
    """One sample at a time: build its kernel by hand, run an ordinary F.conv2d."""
    out_ch, per_group, kh, kw = peer.weight.shape[1:]
    # Input channel read by filter o at slot j: group o // (C_out/g), slot j of that group's channels.
    source = (torch.arange(out_ch)[:, None] // (out_ch // peer.groups)) * per_group + torch.arange(per_group)
    ys = []
    for sample in x:
        att = _hand_attentions(peer, sample)
        mix = att.get("kernel", torch.ones(1))
        weight = sum(mix[k] * peer.weight[k] for k in range(peer.kernels))
        bias = None if peer.bias is None else sum(mix[k] * peer.bias[k] for k in range(peer.kernels))
        if "channel" in att:
            weight = weight * att["channel"][source][:, :, None, None]
        if "filter" in att:
            weight = weight * att["filter"][:, None, None, None]
        if "spatial" in att:
            weight = weight * att["spatial"].reshape(kh, kw)
        xb, padding = sample[None], peer.padding
        if peer.padding_mode != "zeros":
            xb = F.pad(xb, explicit_padding(peer.kernel_size, padding, peer.dilation), mode=peer.padding_mode)
            padding = 0
        ys.append(F.conv2d(xb, weight, bias, peer.stride, padding, peer.dilation, peer.groups))
    return torch.cat(ys)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", PEERS)
def test_grouped_conv_equals_per_sample_loop(method, batch, dtype, tol):
    torch.manual_seed(0)
    original = TwoConv()
    model = PEERS[method](original, config=WITH_DEPTHWISE).eval()
    assert all(isinstance(getattr(model, n), PeerConv2d) for n in "abc")
    _randomise_heads(model)
    x = torch.randn(batch, 4, 9, 9)

    def naive(v: torch.Tensor) -> torch.Tensor:
        return _naive(model.c, torch.tanh(_naive(model.b, torch.tanh(_naive(model.a, v)))))

    with torch.no_grad():
        expected, got = naive(x), model(x)
    torch.testing.assert_close(got, expected, **tol)
    # Each sample's output depends on that sample alone: no batch mixing in the grouped convolution.
    if batch > 1:
        torch.testing.assert_close(model(x[1:2]), expected[1:2], **tol)


@pytest.mark.parametrize("method", PEERS)
def test_train_and_eval_gradients_reach_every_expert_and_head(method, dtype):
    torch.manual_seed(0)
    # Width 16: the heads are wide enough that no hidden ReLU is dead for every sample of the batch.
    model = PEERS[method](TinyResNet(width=16), init="scratch")
    peers = [m for m in model.modules() if isinstance(m, PeerConv2d)]
    assert len(peers) == 9  # every 3x3 conv; the 1x1 downsample is skipped as by transform
    for training in (True, False):
        model.train(training)
        model.zero_grad()
        model(torch.randn(6, 3, 12, 12)).square().sum().backward()
        for peer in peers:
            for name, p in peer.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), (training, name)
                if name == "weight":
                    assert (p.grad.flatten(1).abs().sum(1) > 0).all(), f"an expert of {peer} got no gradient"
                else:
                    assert p.grad.abs().sum() > 0, (training, name)


def _expected_added(conv: nn.Conv2d, method: str, k: int) -> int:
    cin, cout = conv.in_channels, conv.out_channels
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    added = (k - 1) * (conv.weight.numel() + (cout if conv.bias is not None else 0))
    if method == "condconv":
        return added + cin * k + k
    if method == "dyconv":
        hidden = max(1, cin // 4)
        return added + cin * hidden + hidden * k + k
    hidden = max(int(cin * 0.0625), 16)
    added += cin * hidden + 2 * hidden + (hidden + 1) * (cin + cout + kk)
    return added + ((hidden + 1) * k if k > 1 else 0)


@pytest.mark.parametrize("method", PEERS)
def test_parameter_counts_and_macs(method, dtype):
    torch.manual_seed(0)
    original = TinyResNet(width=4).eval()
    model = PEERS[method](original)
    record = model.meta["kdna_peer"]
    family, k = KERNELS[method]
    added = sum(_expected_added(original.get_submodule(n), family, k) for n in record.converted)
    before = sum(p.numel() for p in original.parameters())
    x = torch.randn(1, 3, 16, 16)
    report = kdna_fx.peers.describe(model, x)
    assert report.params_before == before
    assert report.params_after == sum(p.numel() for p in model.parameters()) == before + added
    # A grouped per-sample conv counts as the conv it replaced, so "before" is the original's count exactly.
    assert report.macs_before == count_macs(original, x)[0]
    assert report.macs_after == count_macs(model, x)[0] > report.macs_before
    text = str(report)
    assert "parameters" in text and "MACs @ 1x3x16x16" in text and "layer2.0.down.0" in text


def test_odconv_resnet18_matches_the_papers_parameter_counts():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18()
    counts = [sum(p.numel() for p in kdna_fx.peers.odconv(resnet, kernel_num=k).parameters()) for k in (1, 4)]
    assert [round(c / 1e6, 2) for c in counts] == [11.94, 44.90]  # ODConv paper, ResNet-18 1x / 4x


@pytest.mark.parametrize("method", ["condconv", "dyconv"])
def test_copy_init_keeps_the_function(method, tol):
    torch.manual_seed(0)
    original = TwoConv().eval()
    x = torch.randn(3, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(PEERS[method](original).eval()(x), original(x), **tol)
    experts = PEERS[method](original).a.weight
    # DY-Conv's softmax sums to 1, so equal experts suffice; CondConv's experts differ by noise that cancels.
    assert torch.equal(experts[0], experts[1]) == (method == "dyconv")


@pytest.mark.parametrize("method", PEERS)
def test_result_symbolic_traces(method, tol):
    torch.manual_seed(0)
    model = PEERS[method](TinyResNet(width=4)).eval()
    traced = torch.fx.symbolic_trace(model)
    assert sum(n.target is PF.dynamic_conv2d for n in traced.graph.nodes) == 9
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), **tol)


def test_eligibility_is_transforms():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    config = kdna_fx.KDNAConfig(leaf_modules=(Block,), exclude=r"^2$")
    converted = kdna_fx.peers.dyconv(model, config=config)
    assert isinstance(converted.get_submodule("0"), DynamicConv2d)
    assert converted.meta["kdna_peer"].converted == ("0",)
    assert isinstance(converted.get_submodule("1.conv"), nn.Conv2d)  # opaque leaf: not traced into
    reasons = {s.name: s.reason for s in converted.meta["kdna_peer"].skipped}
    assert "exclude" in reasons["2"] and "kernel 1x1" in reasons["3"]
    assert isinstance(model[0], nn.Conv2d)  # the caller's model is untouched


def test_functional_convs_are_left_with_a_reason():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.weight, padding=1)

    with pytest.warns(kdna_fx.SkippedSiteWarning, match="nn.Conv2d modules only"), \
            pytest.warns(kdna_fx.NoEligibleConvWarning, match="CondConv"):
        converted = kdna_fx.peers.condconv(Functional())
    assert converted.meta["kdna_peer"].converted == ()
    assert [s.name for s in converted.meta["kdna_peer"].skipped] == ["weight"]


def test_temperature_is_a_buffer_and_settable():
    model = kdna_fx.peers.dyconv(TinyResNet(width=4), kernels=2, init="scratch")  # copies would hide T
    layers = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert all("temperature" in dict(m.named_buffers()) and float(m.temperature) == 30.0 for m in layers)
    x = torch.randn(2, 3, 8, 8)
    hot = model.eval()(x)
    assert kdna_fx.peers.set_temperature(model, 1.0) == len(layers)
    assert all(float(m.temperature) == 1.0 for m in layers)
    assert not torch.allclose(model(x), hot)  # read at run time, not baked in when converted
    with pytest.raises(kdna_fx.ConfigError, match="temperature"):
        kdna_fx.peers.set_temperature(model, -1.0)


@pytest.mark.parametrize("call, match", [
    (lambda m: kdna_fx.peers.condconv(m, experts=0), "experts must be an integer >= 1"),
    (lambda m: kdna_fx.peers.dyconv(m, kernels=2.5), "kernels must be an integer >= 1"),
    (lambda m: kdna_fx.peers.odconv(m, kernel_num=True), "kernel_num must be an integer >= 1"),
    (lambda m: kdna_fx.peers.dyconv(m, temperature=0), "temperature must be a positive"),
    (lambda m: kdna_fx.peers.odconv(m, reduction=-1.0), "reduction must be a positive"),
    (lambda m: kdna_fx.peers.condconv(m, init="kaiming"), "init must be 'copy'"),
    (lambda m: kdna_fx.peers.condconv(m, config={"kernel_sizes": (3,)}), "config must be a kdna_fx.KDNAConfig"),
    (lambda m: kdna_fx.peers.odconv(lambda x: x), "expects a torch.nn.Module"),
    (lambda m: kdna_fx.peers.odconv(kdna_fx.peers.condconv(m)), "already converted by kdna_fx.peers"),
    (lambda m: kdna_fx.peers.describe(m), "was not converted by kdna_fx.peers"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(kdna_fx.KDNAError, match=match):
        call(TwoConv())


def test_odconv_batchnorm_refuses_training_on_one_sample():
    model = kdna_fx.peers.odconv(TwoConv()).train()
    with pytest.raises(kdna_fx.GateBatchSizeError, match="batch size >= 2"):
        model(torch.randn(1, 4, 9, 9))
    model.eval()(torch.randn(1, 4, 9, 9))
