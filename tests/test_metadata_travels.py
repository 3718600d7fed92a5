"""What kdna_fx leaves on a model travels with it: the TransformRecord (with a graph's node tags), the PeerRecord
and the ModelSpec survive any sequence of pickle, torch.save/torch.load, copy.deepcopy and copy.copy, on a
rewritten graph, a module-swapped model, a folded one, a peer, a zoo model and the module of ``as_function``
(kdna_fx/carried.py). A deepcopy right after unpickling (an EMA copy) once lost them all.
"""
from __future__ import annotations

import copy
import functools
import io
import pickle
from typing import Any, Callable

import pytest
import torch
from torch import nn

import kdna_fx
from kdna_fx import KDNAConfig
from kdna_fx.datamodel import find_record, module_form, peer_record
from kdna_fx.models import spec_of
from kdna_fx.testing import TinyResNet, randomize_adapters

# One xdist worker runs the whole file (make test: -n 2 --dist loadgroup): its tests share a cached build.
# one_thread: tiny models, on a shared 2-core machine two threads only fight.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("test_metadata_travels")]

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Untraceable(nn.Module):
    """Data-dependent control flow: the model has no graph form."""

    def __init__(self):
        super().__init__()
        self.net = TinyResNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 100:  # torch.fx cannot trace this
            x = x * 0
        return self.net(x)


def _transformed(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(model)
    randomize_adapters(kmodel, generator=torch.Generator().manual_seed(1))
    return kmodel.eval()


def _graph() -> nn.Module:
    """The graph form (passes.lower), which keeps the model it was lowered from as its module form."""
    return kdna_fx.passes.lower(_transformed(TinyResNet()), (X,))


MODELS: dict[str, Callable[[], Any]] = {
    "model": lambda: _transformed(TinyResNet()),
    "graph": _graph,
    "swap": lambda: _transformed(Untraceable()),
    "folded": lambda: kdna_fx.fold(_graph()),
    "folded-swap": lambda: kdna_fx.fold(_transformed(Untraceable())),
    "peer": lambda: kdna_fx.peers.odconv(TinyResNet()).eval(),
    "peer-swap": lambda: kdna_fx.peers.odconv(Untraceable()).eval(),
    "zoo": lambda: kdna_fx.models.create_model("resnet18.kdna", num_classes=10, width=0.25, small_stem=True).eval(),
    "as_function": lambda: kdna_fx.as_function(_graph()),
}


def _pickle(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def _torch_save(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


STEPS = {"pickle": _pickle, "torch.save": _torch_save, "deepcopy": copy.deepcopy, "copy": copy.copy}
# Every pickle round trip (either way) followed by a deepcopy, twice over; and copy.copy in between.
SEQUENCES = [(a, "deepcopy", b, "deepcopy") for a in ("pickle", "torch.save") for b in ("pickle", "torch.save")] + [
    ("copy", "pickle", "copy", "deepcopy", "torch.save", "copy"),
    ("deepcopy", "copy", "torch.save", "copy", "pickle"),
]


def _module(obj: Any) -> nn.Module:
    return obj.module if isinstance(obj, kdna_fx.passes.FunctionalModel) else obj


def _run(obj: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(obj, kdna_fx.passes.FunctionalModel):
            return obj(obj.parents, obj.params, obj.buffers, x)
        return obj.eval()(x)


def _report(model: nn.Module) -> dict[str, Any]:
    report = kdna_fx.peers.describe(model, X[:1]) if peer_record(model) else kdna_fx.report(model, X[:1])
    return {k: v for k, v in report.to_dict().items() if k != "model"}  # the class name is torch.fx's to choose


def _facts(obj: Any) -> dict[str, Any]:
    """What must travel: kdna_fx's records and stamp, a graph's module form, outputs, and what fold and report make
    of it."""
    model = _module(obj)
    record = find_record(model)
    facts = {"output": _run(obj, X), "record": record, "spec": spec_of(model), "peer": peer_record(model),
             "report": _report(model)}
    if isinstance(model, torch.fx.GraphModule) and record is not None:
        source = module_form(model)
        assert source is not model and type(source) is TinyResNet
        for name in ("layer1.0.conv1.weight", "layer1.0.conv2.gate.fc1.weight"):  # still one model: shared tensors
            assert model.get_parameter(name) is source.get_parameter(name), name
        facts["module form output"] = _run(source, X)
    if record is not None and not record.folded:
        facts["folded output"] = _run(kdna_fx.fold(model), X)
    return facts


@functools.cache
def _original(kind: str) -> tuple[Any, dict[str, Any]]:
    original = MODELS[kind]()
    return original, _facts(original)


# pickle then deepcopy, and the two mixed sequences, run in the default tier for every model; the other pickle /
# torch.save pairings repeat them (0.2 s each) and run in make test-all.
@pytest.mark.parametrize("steps", [pytest.param(s, id="-".join(s), marks=[pytest.mark.slow] * (
    len(s) == 4 and s[:3:2] != ("pickle", "pickle"))) for s in SEQUENCES])
@pytest.mark.parametrize("kind", list(MODELS))
def test_kdna_fx_metadata_travels_with_the_model(kind, steps):
    original, expected = _original(kind)
    assert expected["record"] is not None or expected["peer"] is not None
    assert kind != "zoo" or expected["spec"] is not None
    travelled = original
    for step in steps:
        travelled = STEPS[step](travelled)
    facts = _facts(travelled)
    for key, value in expected.items():
        assert torch.equal(facts[key], value) if isinstance(value, torch.Tensor) else facts[key] == value, key
    # and it travels again: a deepcopy right after a pickle round trip (an EMA copy, say)
    again = _module(copy.deepcopy(_pickle(travelled)))
    assert (find_record(again), peer_record(again), spec_of(again)) == \
        (expected["record"], expected["peer"], expected["spec"])


def test_a_deepcopy_right_after_torch_load_can_be_folded():
    """The issue: an EMA copy of an unpickled model lost its record."""
    kmodel = kdna_fx.transform(TinyResNet()).eval()
    ema = copy.deepcopy(_torch_save(kmodel))
    assert torch.equal(_run(kdna_fx.fold(ema), X), _run(kdna_fx.fold(kmodel), X))


def test_a_stamped_swapped_model_keeps_its_stamp():
    model = kdna_fx.models.create_model("resnet18.replace", num_classes=10, width=0.25, small_stem=True,
                                        config=KDNAConfig(rewrite="swap"))
    assert not isinstance(model, torch.fx.GraphModule)
    assert spec_of(copy.deepcopy(_pickle(copy.copy(model)))) == spec_of(model) is not None
