"""The ``relaxed`` tag: replace mode whose children carry a rank-R kernel residual, R an option of create_model."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import kdna_fx
import kdna_fx.models as zoo
from kdna_fx.adapters import ChildAdapter, effective_rank

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(num_classes=10, in_chans=1, small_stem=True, width=0.25)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def residual_params(model: nn.Module, rank: int) -> int:
    """What a rank-``rank`` residual B A adds to every child of ``model``: B [C_out, r] and A [r, C_in/g k k]."""
    total = 0
    for child in (m for m in model.modules() if isinstance(m, ChildAdapter)):
        fan = child.in_channels // child.groups * child.kernel_size[0] * child.kernel_size[1]
        r = effective_rank(rank, child.out_channels, child.in_channels, child.kernel_size, child.groups)
        total += r * (child.out_channels + fan)
    return total


def test_relaxed_is_a_tag_of_every_architecture_and_of_torchvision_names() -> None:
    for arch in zoo.architectures():
        assert f"{arch}.relaxed" in zoo.list_models()
    assert zoo.model_options("resnet18.relaxed") == zoo.model_options("resnet18.replace") + ["rank"]
    assert zoo.model_options("torchvision/resnet18.relaxed")[-1] == "rank"
    assert zoo.RELAXED_RANK == 4


@pytest.mark.parametrize("rank", [None, 8])
def test_relaxed_is_replace_plus_the_rank_r_residuals(rank: int | None) -> None:
    options = {} if rank is None else {"rank": rank}
    replace = zoo.create_model("resnet18.replace", **SMALL)
    relaxed = zoo.create_model("resnet18.relaxed", **SMALL, **options)
    r = rank or zoo.RELAXED_RANK
    children = [m for m in relaxed.modules() if isinstance(m, ChildAdapter)]
    assert children and all(c.lowrank_b is not None and c.lowrank_b.shape[1] == r for c in children)
    assert n_params(relaxed) == n_params(replace) + residual_params(replace, r) > n_params(replace)
    assert n_params(zoo.create_model("resnet18.relaxed", **SMALL)) == 350_243  # the frontier's relaxed-r4-w0.25
    assert zoo.spec_of(relaxed) == zoo.ModelSpec("resnet18.relaxed", {**SMALL, **options}, in_chans=1)


def test_relaxed_is_the_replace_transform_with_the_rank_in_the_config() -> None:
    """The same model as replace mode given the sharing config mapped to AdapterConfig(rank=R), weights included."""
    config = zoo.sharing_config("resnet18").map_adapters(lambda a: dataclasses.replace(a, rank=8))
    torch.manual_seed(0)
    expected = zoo.create_model("resnet18.replace", config=config, **SMALL)
    torch.manual_seed(0)
    relaxed = zoo.create_model("resnet18.relaxed", rank=8, **SMALL)
    a, b = expected.state_dict(), relaxed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_full_size_relaxed_builds_with_rank_8() -> None:
    model = zoo.create_model("resnet18.relaxed", rank=8)
    replace = zoo.create_model("resnet18.replace")
    assert n_params(model) == n_params(replace) + residual_params(replace, 8)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_relaxed_takes_a_config_and_gate_norm() -> None:
    config = kdna_fx.KDNAConfig().map_adapters(lambda a: dataclasses.replace(a, gate_norm="layer"))
    model = zoo.create_model("resnet18.relaxed", config=config, rank=2, **SMALL)
    children = [m for m in model.modules() if isinstance(m, ChildAdapter)]
    assert children and all(c.lowrank_b.shape[1] == 2 for c in children)
    assert n_params(zoo.create_model("resnet18.relaxed", gate_norm="layer", **SMALL)) > 0


@pytest.mark.parametrize("rank", [0, -1, 2.5, "4", True, None])
def test_a_bad_rank_is_a_one_line_config_error_naming_the_fix(rank: object) -> None:
    with pytest.raises(kdna_fx.ConfigError) as err:
        zoo.create_model("resnet18.relaxed", rank=rank, **SMALL)
    message = str(err.value)
    assert "\n" not in message and "rank must be an integer >= 1 or 'full'" in message
    assert "resnet18.replace" in message  # no residual: the replace tag


def test_rank_on_another_tag_names_the_tag_that_takes_it() -> None:
    with pytest.raises(kdna_fx.KDNATypeError, match=r"\(use resnet18.relaxed\)$"):
        zoo.create_model("resnet18.replace", rank=4)
    with pytest.raises(kdna_fx.KDNATypeError, match="does not take option"):
        zoo.create_model("resnet18.relaxed", experts=4)
