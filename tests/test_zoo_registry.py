"""The zoo registry: tags of one architecture, one resolver for zoo, torchvision and timm names, aliases,
and the ModelSpec every built model carries."""
from __future__ import annotations

import copy
import pickle

import pytest
import timm
from hypothesis import given, strategies as st
import torch
import torchvision
from torch import fx, nn

import kdna_fx
import kdna_fx.models as zoo
from kdna_fx.adapters import ChildAdapter

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(num_classes=10, in_chans=1, small_stem=True)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small(name: str) -> dict:
    return dict(SMALL, **({"width": 0.25} if "width" in zoo.model_options(name) else {}))


def test_every_architecture_lists_its_tags() -> None:
    peers = [t for t, tag in zoo.TAGS.items() if tag.peer and hasattr(kdna_fx.peers, tag.peer)]
    assert peers and set(peers) >= {"condconv", "dyconv", "odconv"}
    for arch in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v2_050", "convnext_tiny"):
        assert zoo.list_models(f"{arch}.*") == sorted(f"{arch}.{t}" for t in ["plain", "replace", "relaxed", "kdna", *peers])
    assert set(zoo.list_models("*.kdna", aliases=True)) < set(zoo.list_models(aliases=True))
    assert "kdna_resnet18" in zoo.list_models("kdna_*", aliases=True) and not zoo.list_models("kdna_*")


@pytest.mark.parametrize("alias, tagged", [("kdna_resnet18", "resnet18.kdna"), ("replace_resnet50", "resnet50.replace"),
                                           ("kdna_mobilenet_v2_050", "mobilenet_v2_050.kdna"),
                                           ("resnet18", "resnet18.plain")])
def test_old_names_are_aliases_of_tags(alias: str, tagged: str) -> None:
    torch.manual_seed(0)
    a = zoo.create_model(alias, **small(alias))
    torch.manual_seed(0)
    b = zoo.create_model(tagged, **small(tagged))
    assert list(a.state_dict()) == list(b.state_dict()) and n_params(a) == n_params(b)
    assert zoo.spec_of(a).name == zoo.spec_of(b).name == tagged
    assert zoo.model_options(alias) == zoo.model_options(tagged)


@pytest.mark.parametrize("tag", [t for t, tag in zoo.TAGS.items() if tag.peer and hasattr(kdna_fx.peers, tag.peer)])
def test_a_peer_tag_is_its_peers_function_on_the_plain_network(tag: str) -> None:
    peer = getattr(kdna_fx.peers, zoo.TAGS[tag].peer)
    torch.manual_seed(0)
    model = zoo.create_model(f"resnet18.{tag}", num_classes=10, width=0.25)
    expected = peer(zoo.create_model("resnet18", num_classes=10, width=0.25))
    assert n_params(model) == n_params(expected) != n_params(zoo.create_model("resnet18", num_classes=10, width=0.25))
    assert kdna_fx.datamodel.peer_record(model) is not None
    # MobileNetV2's peers convert the convs its sharing config names (its 1x1 convs), as replace mode shares
    mobile = zoo.create_model(f"mobilenet_v2.{tag}", num_classes=10, width=0.25)
    config = {"config": zoo.sharing_config("mobilenet_v2")} if "config" in zoo.model_options(f"resnet18.{tag}") else {}
    assert n_params(mobile) == n_params(peer(zoo.create_model("mobilenet_v2", num_classes=10, width=0.25), **config))


def test_a_new_peer_is_one_table_line_and_a_missing_function_no_tag(monkeypatch) -> None:
    monkeypatch.setitem(zoo.TAGS, "condconv2", zoo.Tag(peer="condconv"))
    monkeypatch.setitem(zoo.TAGS, "not_there", zoo.Tag(peer="no_such_peer_function"))
    assert "resnet18.condconv2" in zoo.list_models() and "resnet18.not_there" not in zoo.list_models()
    assert zoo.model_options("resnet18.condconv2")[-3:] == ["experts", "config", "init"]
    model = zoo.create_model("resnet18.condconv2", num_classes=10, width=0.25, experts=2)
    assert kdna_fx.datamodel.peer_record(model).method == "CondConv (K=2)"
    with pytest.raises(kdna_fx.ConfigError, match="no tag 'not_there'"):
        zoo.create_model("resnet18.not_there")


def test_torchvision_and_timm_names_build_without_weights() -> None:
    tv = zoo.create_model("torchvision/resnet18", num_classes=7)
    assert n_params(tv) == n_params(torchvision.models.resnet18(num_classes=7))
    tm = zoo.create_model("timm/resnet18", num_classes=7)
    assert n_params(tm) == n_params(timm.create_model("resnet18", num_classes=7))
    replaced = zoo.create_model("timm/resnet18.replace", num_classes=7, gate_norm="layer")
    assert any(isinstance(m, ChildAdapter) for m in replaced.modules()) and n_params(replaced) < n_params(tm)
    assert kdna_fx.plan_of(replaced).config.adapter.gate_norm == "layer"
    odconv = zoo.create_model("torchvision/resnet18.odconv", num_classes=7)
    assert kdna_fx.datamodel.peer_record(odconv).method == "ODConv 1x"
    # a timm pretrained tag is not a kdna_fx tag: the whole name goes to timm
    tagged = zoo.create_model("timm/resnet18.a1_in1k", num_classes=7)
    assert zoo.spec_of(tagged).name == "timm/resnet18.a1_in1k" and kdna_fx.datamodel.converted_by(tagged) is None


@pytest.mark.parametrize("name, error, match", [
    ("kdna_resnet81", kdna_fx.ConfigError, "Did you mean 'kdna_resnet18'"),
    ("resnet18.kdnna", kdna_fx.ConfigError, "its tags: plain, replace, kdna"),
    ("hub/resnet18", kdna_fx.ConfigError, "torchvision/<name> or timm/<name>"),
    ("torchvision/resnet181", kdna_fx.ConfigError, "torchvision has no model 'resnet181'"),
    ("timm/resnet181", kdna_fx.ConfigError, "timm has no model 'resnet181'"),
    ("", kdna_fx.ConfigError, "non-empty string"),
])
def test_bad_names_are_clear(name: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        zoo.create_model(name)


def test_options_are_checked_per_tag() -> None:
    assert zoo.model_options("resnet18.kdna")[-1] == "gate_norm"
    assert zoo.model_options("resnet18.replace")[-2:] == ["config", "gate_norm"]
    assert "gate_norm" not in zoo.model_options("resnet18")
    assert "width" not in zoo.model_options("mobilenet_v2_050.kdna")
    with pytest.raises(kdna_fx.KDNATypeError, match="gate_norm"):
        zoo.create_model("resnet18.plain", gate_norm="layer")
    with pytest.raises(kdna_fx.ConfigError, match="gate_norm"):
        zoo.create_model("resnet18.replace", gate_norm="group")
    with pytest.raises(kdna_fx.KDNATypeError, match="KDNAConfig"):
        zoo.create_model("resnet18.replace", config={"kernel_sizes": [3]})


def test_sharing_config_resolves_every_name() -> None:
    for name in ("mobilenet_v2", "mobilenet_v2.odconv", "kdna_mobilenet_v2_050", "replace_mobilenet_v2"):
        assert zoo.sharing_config(name).kernel_sizes == (1,)
    assert zoo.sharing_config("timm/resnet18").kernel_sizes == (3,)
    assert zoo.sharing_config("vgg11") == kdna_fx.KDNAConfig()


@pytest.mark.integration  # builds zoo models at full size
def test_a_spec_from_options_and_an_old_run_spec_build_the_same_model() -> None:
    from kdna_fx.source import model_spec

    options = dict(num_classes=10, in_chans=1, small_stem=True, width=0.25, gate_norm="layer")
    spec = model_spec("replace_mobilenet_v2", **options)
    assert zoo.spec_of(spec.build()) == zoo.ModelSpec("mobilenet_v2.replace", options, in_chans=1)
    # a `kdna train` checkpoint of an older kdna_fx stored the options flat, defaults and all
    old = zoo.ModelSpec.from_dict({"name": "replace_mobilenet_v2", **options})
    assert old.kwargs == spec.kwargs and old.in_chans == 1
    assert zoo.ModelSpec.from_dict({"name": "torchvision/resnet18", "num_classes": 3, "in_chans": 3, "width": 1.0,
                                    "small_stem": False, "gate_norm": None}).kwargs == {"num_classes": 3}
    with pytest.raises(kdna_fx.ConfigError, match="gate_norm='layer'"):
        model_spec("resnet18", **options)
    assert model_spec("resnet18", width=1.0, gate_norm=None).kwargs == {"width": 1.0}
    vgg = model_spec("vgg11", num_classes=3, in_chans=1)  # a bare torchvision name; it takes no in_chans
    assert vgg == zoo.ModelSpec("torchvision/vgg11", {"num_classes": 3})
    assert n_params(vgg.build()) == n_params(torchvision.models.vgg11(num_classes=3))
    with pytest.raises(kdna_fx.ConfigError, match="width=0.5"):
        model_spec("vgg11", width=0.5)


# ---- the ModelSpec a built model carries ---------------------------------------------------------------------
@pytest.mark.integration  # builds every zoo model
def test_every_zoo_model_carries_a_json_spec() -> None:
    import json

    for name in zoo.list_models():
        spec = zoo.spec_of(zoo.create_model(name, **small(name)))
        assert spec.name == name and spec.kwargs == small(name)
        json.dumps(spec.to_dict())
        assert zoo.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    config = kdna_fx.KDNAConfig(kernel_sizes=(1, 3))
    spec = zoo.spec_of(zoo.create_model("resnet18.replace", num_classes=10, width=0.25, config=config))
    assert spec.kwargs["config"] == config
    assert spec.to_dict()["kwargs"]["config"] == {"__kdna_config__": config.to_dict()}
    assert zoo.spec_of(torchvision.models.resnet18()) is None
    assert zoo.spec_of("resnet18") is None


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                max_size=3), max_leaves=6)


@given(kwargs=st.dictionaries(st.text(min_size=1, max_size=6), _JSON, max_size=4),
       in_chans=st.none() | st.integers(1, 8), image_size=st.none() | st.integers(1, 512))
def test_a_spec_of_json_options_reads_back_as_itself(kwargs, in_chans, image_size) -> None:
    import json

    spec = zoo.ModelSpec("resnet18", kwargs, in_chans, image_size)
    assert zoo.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_spec_reads_as_the_call_that_builds_it() -> None:
    spec = zoo.ModelSpec("kdna_resnet18", {"width": 0.25, "num_classes": 10})
    assert str(spec) == "create_model('kdna_resnet18', width=0.25, num_classes=10)"
    built = eval(str(spec), {"create_model": zoo.create_model})
    assert zoo.spec_of(built).kwargs == spec.kwargs


def test_the_spec_records_the_input_a_model_is_made_for() -> None:
    # ImageNet form: 224 px; a small stem is for small images of no one size until record_input says which
    spec = zoo.spec_of(zoo.create_model("resnet18", in_chans=1))
    assert (spec.in_chans, spec.image_size) == (1, 224)
    spec = zoo.spec_of(zoo.create_model("torchvision/resnet18"))
    assert (spec.in_chans, spec.image_size) == (3, 224)
    model = zoo.create_model("resnet18", **SMALL)
    assert (zoo.spec_of(model).in_chans, zoo.spec_of(model).image_size) == (1, None)
    zoo.record_input(model, image_size=28)
    assert (zoo.spec_of(model).in_chans, zoo.spec_of(model).image_size) == (1, 28)
    assert zoo.spec_of(zoo.spec_of(model).build()).image_size == 28  # a rebuilt model keeps it
    # a stamp from before inputs were recorded says nothing
    old = zoo.ModelSpec.from_dict({"name": "resnet18", "kwargs": {}})
    assert (old.in_chans, old.image_size) == (None, None)


def test_options_json_cannot_hold_leave_no_spec() -> None:
    model = zoo.create_model("timm/resnet18", num_classes=10, act_layer=nn.ReLU)
    assert zoo.spec_of(model) is None


@pytest.mark.parametrize("rewrite", ["graph", "swap"])
def test_the_spec_survives_transform_deepcopy_and_pickle(rewrite: str) -> None:
    model = zoo.create_model("resnet18", num_classes=10, width=0.25)
    expected = zoo.spec_of(model)
    kmodel = kdna_fx.transform(model, kdna_fx.KDNAConfig(rewrite=rewrite))
    assert isinstance(kmodel, fx.GraphModule) == (rewrite == "graph")  # a new GraphModule, or a deep copy
    assert zoo.spec_of(kmodel) == expected
    for again in (copy.deepcopy(kmodel), pickle.loads(pickle.dumps(kmodel)), torch.compile(kmodel)):
        assert zoo.spec_of(again) == expected
    assert zoo.spec_of(copy.deepcopy(copy.deepcopy(kmodel))) == expected


def test_the_spec_of_a_zoo_graph_module_survives_deepcopy_and_pickle() -> None:
    model = zoo.create_model("resnet18.kdna", **small("resnet18.kdna"))
    for again in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert zoo.spec_of(again) == zoo.ModelSpec("resnet18.kdna", small("resnet18.kdna"), in_chans=1)


def test_rebuilding_from_the_spec_gives_the_same_architecture() -> None:
    config = kdna_fx.KDNAConfig(kernel_sizes=(1, 3))
    for name, kwargs in (("resnet18.replace", dict(num_classes=10, width=0.25, config=config)),
                         ("convnext_tiny.kdna", dict(small("convnext_tiny.kdna"), gate_norm="layer", drop_path=0.0))):
        model = zoo.create_model(name, **kwargs)
        again = zoo.spec_of(model).build()
        assert [(k, v.shape) for k, v in again.state_dict().items()] == \
            [(k, v.shape) for k, v in model.state_dict().items()]
    with pytest.raises(kdna_fx.StateError, match="a model spec is"):
        zoo.ModelSpec.from_dict({"kwargs": {}})
