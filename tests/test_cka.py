"""kdna_fx.cka: linear CKA, the streaming (minibatch, unbiased HSIC) estimator, layer_similarity and `kdna cka`."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdna_fx
from kdna_fx.testing import write_tiny_fashion_mnist
from kdna_fx.data import rebatch
from kdna_fx.errors import DataError
from kdna_fx.cka import (CKAError, LayerSimilarity, MinibatchCKA, gram, layer_similarity, linear_cka,
                         stages, unbiased_cka, unbiased_hsic)
from kdna_fx.cli import main
from kdna_fx.errors import KDNAError
from kdna_fx.testing import TinyResNet

# One xdist worker runs the whole file (make test: -n 2 --dist loadgroup): its tests share a cached build.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("test_cka")]


def features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(features(d, d, seed + 1000))
    return q


def reference_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), eq. 5, written with explicit sums over distinct indices (no matrix algebra)."""
    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    trace = sum(kt[i, j] * lt[j, i] for i in range(n) for j in range(n))
    sums = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross = sum(kt[i, j] * lt[j, m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sums - 2.0 / (n - 2) * cross) / (n * (n - 3))


# ---- linear_cka ---------------------------------------------------------------------------------------------------
shapes = st.tuples(st.integers(4, 40), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**16))


@given(shapes)
def test_linear_cka_is_one_with_itself_and_symmetric(shape):
    n, dx, dy, seed = shape
    x, y = features(n, dx, seed), features(n, dy, seed + 1)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert -1e-12 <= linear_cka(x, y) <= 1 + 1e-12


@given(shapes, st.floats(1e-3, 1e3))
def test_linear_and_unbiased_cka_are_invariant_to_orthogonal_maps_and_isotropic_scaling(shape, scale):
    n, dx, dy, seed = shape
    x, y = features(n, dx, seed), features(n, dy, seed + 1) + features(n, dx, seed)[:, :1]  # related a little
    x2, y2 = scale * x @ orthogonal(dx, seed), y @ orthogonal(dy, seed + 7) / scale
    for cka in (linear_cka, unbiased_cka):
        expected = cka(x, y)
        for a, b in ((x2, y), (x, y2), (x2, y2)):
            assert cka(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(st.integers(4, 30), st.integers(1, 8), st.integers(0, 2**16), st.floats(-100, 100))
def test_unbiased_cka_ignores_a_shift_of_the_features(n, d, seed, shift):
    x, y = features(n, d, seed), features(n, d, seed + 1)
    assert unbiased_cka(x + shift, y) == pytest.approx(unbiased_cka(x, y), rel=1e-9, abs=1e-12)
    k, lg = gram(x).numpy(), gram(y).numpy()  # and so does the estimator itself, on uncentred Grams
    k_shift = ((x + shift) @ (x + shift).T).numpy()
    assert reference_hsic(k_shift, lg) == pytest.approx(reference_hsic(k, lg), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("n, dx, dy", [(50, 3, 4), (6, 200, 300)])  # the feature form, then the Gram form
def test_linear_cka_matches_the_centred_gram_definition(n, dx, dy):
    x, y = features(n, dx, 0), features(n, dy, 1) + features(n, dx, 0).sum(1, keepdim=True)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, lg = h @ x @ x.T @ h, h @ y @ y.T @ h
    expected = (k * lg).sum() / (torch.linalg.norm(k) * torch.linalg.norm(lg))
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-10)


def test_independent_features_are_near_zero_when_n_is_much_larger_than_d():
    x, y = features(4000, 4, 0), features(4000, 5, 1)
    assert linear_cka(x, y) < 0.01
    assert abs(unbiased_cka(x[:1000], y[:1000])) < 0.01
    assert linear_cka(x, torch.cat([x, y], 1)) > 0.4  # sanity: shared features do show


def test_float32_and_float64_inputs_agree(dtype, tol):
    x, y = features(32, 6, 0), features(32, 9, 1) + features(32, 6, 0)[:, :2].repeat(1, 5)[:, :9]
    assert linear_cka(x.to(dtype), y.to(dtype)) == pytest.approx(linear_cka(x, y), rel=tol["rtol"], abs=tol["atol"])
    assert unbiased_cka(x.to(dtype), y.to(dtype)) == pytest.approx(unbiased_cka(x, y), rel=tol["rtol"],
                                                                    abs=tol["atol"])
    stream = MinibatchCKA()
    stream.update([x.to(dtype), y.to(dtype)])
    assert stream.matrix().dtype == torch.float64
    torch.testing.assert_close(stream.matrix()[0, 1].item(), unbiased_cka(x, y), **tol)


@pytest.mark.parametrize("call, needle", [
    (lambda: linear_cka(torch.randn(5, 3), torch.randn(6, 3)), "X has 5 rows but Y has 6"),
    (lambda: linear_cka(torch.randn(5, 3, 2), torch.randn(5, 3)), "reshape(len(X), -1)"),
    (lambda: linear_cka(torch.randn(5), torch.randn(5, 3)), "feature matrix [n, d]"),
    (lambda: linear_cka(torch.randn(1, 3), torch.randn(1, 3)), "give at least 2"),
    (lambda: unbiased_cka(torch.randn(3, 3), torch.randn(3, 3)), "give at least 4"),
    (lambda: linear_cka(torch.ones(5, 3), torch.randn(5, 3)), "zero variance"),
    (lambda: unbiased_cka(torch.ones(6, 3), torch.randn(6, 3)), "nearly) constant"),
    (lambda: linear_cka(torch.tensor([[1.0, math.nan]] * 3), torch.randn(3, 2)), "NaN"),
    (lambda: MinibatchCKA().update([torch.randn(3, 2)]), "batches of at least 4"),
    (lambda: MinibatchCKA().update([torch.randn(5, 2), torch.randn(6, 2)]), "same b examples"),
    (lambda: MinibatchCKA().matrix(), "call update first"),
    (lambda: unbiased_hsic(torch.eye(3), torch.eye(3)), "at least 4"),
])
def test_bad_inputs_raise_clear_errors(call, needle):
    with pytest.raises(CKAError) as info:
        call()
    assert needle in str(info.value)
    assert isinstance(info.value, KDNAError) and isinstance(info.value, ValueError)


# ---- the streaming estimator --------------------------------------------------------------------------------------
def test_unbiased_hsic_matches_the_estimator_written_with_sums():
    x, y = features(9, 4, 0), features(9, 7, 1)
    k, lg = gram(x), gram(y)
    assert unbiased_hsic(k, lg) == pytest.approx(reference_hsic(k.numpy(), lg.numpy()), rel=1e-12)


def test_one_batch_of_the_stream_is_the_full_batch_unbiased_cka():
    layers = [features(24, 5, 0), features(24, 30, 1), features(24, 2, 2) + features(24, 5, 0)[:, :2]]
    stream = MinibatchCKA()
    stream.update(layers)
    matrix = stream.matrix()
    for i, j in itertools.product(range(3), repeat=2):
        assert matrix[i, j].item() == pytest.approx(unbiased_cka(layers[i], layers[j]), rel=1e-12, abs=1e-14)
    assert torch.equal(matrix, matrix.T) and torch.equal(matrix.diagonal(), torch.ones(3, dtype=torch.float64))


def test_several_batches_average_the_per_batch_hsic():
    layers = [features(30, 4, 0), features(30, 6, 1) + features(30, 4, 0).repeat(1, 2)[:, :6]]
    cuts = [(0, 8), (8, 18), (18, 30)]  # uneven batches: each counts once, as in Nguyen et al.
    stream = MinibatchCKA()
    hsic = np.zeros((2, 2))
    for a, b in cuts:
        batch = [f[a:b] for f in layers]
        stream.update(batch)
        grams = [gram(f).numpy() for f in batch]
        hsic += np.array([[reference_hsic(grams[i], grams[j]) for j in range(2)] for i in range(2)]) / len(cuts)
    expected = hsic[0, 1] / math.sqrt(hsic[0, 0] * hsic[1, 1])
    assert stream.batches == 3
    assert stream.matrix()[0, 1].item() == pytest.approx(expected, rel=1e-12)
    assert stream.matrix()[0, 1].item() != pytest.approx(unbiased_cka(*layers), rel=1e-6)  # not the full batch


def test_a_constant_layer_gets_nan_not_a_number_it_does_not_have():
    stream = MinibatchCKA()
    stream.update([features(8, 3, 0), torch.zeros(8, 3)])
    matrix = stream.matrix()
    assert matrix[0, 0] == 1 and matrix[0, 1].isnan() and matrix[1, 1].isnan()


@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.integers(4, 40), st.integers(4, 10))
def test_batches_are_recut_and_never_smaller_than_four(chunks, images, batch_size):
    stream = [torch.full((c, 1, 1, 1), float(i)) for i, c in enumerate(chunks)]
    out = list(rebatch(iter(stream), images, batch_size, min_batch=4))
    total = min(images, sum(chunks))
    assert torch.equal(torch.cat(out), torch.cat(stream)[:total])  # every image once, in order
    assert all(len(b) == batch_size for b in out[:-1])
    if len(out) > 1:  # a remainder of 1-3 images joins the batch before it
        assert 4 <= len(out[-1]) < batch_size + 4


# ---- layer_similarity -------------------------------------------------------------------------------------------
def images(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = TinyResNet(width=4)
    return model, kdna_fx.transform(model)


def test_original_and_transformed_models_give_the_same_layers(models):
    model, kmodel = models
    a = layer_similarity(model, images(), batch_size=16, progress=False)
    b = layer_similarity(kmodel, images(), batch_size=16, progress=False)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert a.names == b.names and sorted(a.names) == sorted(convs) and a.images == b.images == 40
    children = [path for path, _, _ in kdna_fx.datamodel.children(kmodel)]
    assert children and set(children) <= set(b.names)  # children are measured under their conv's name
    for sim in (a, b):
        assert torch.equal(sim.matrix, sim.matrix.T) and torch.isfinite(sim.matrix).all()
        assert torch.equal(sim.matrix.diagonal(), torch.ones(len(sim.names), dtype=torch.float64))
    # The convs before the first child compute the same thing in both models (init="copy").
    first_child = min(b.names.index(c) for c in children)
    torch.testing.assert_close(a.matrix[:first_child, :first_child], b.matrix[:first_child, :first_child])
    assert not torch.allclose(a.matrix, b.matrix)  # children share kernels: the maps differ after


def test_layer_similarity_is_reproducible_and_leaves_the_model_as_it_was(models):
    model, _ = models
    model.train()
    model.layer1[0].bn1.eval()
    rng = torch.get_rng_state()
    first = layer_similarity(model, images(60), images=40, batch_size=16, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    again = layer_similarity(model, images(60), images=40, batch_size=16, seed=3, progress=False)
    other = layer_similarity(model, images(60), images=40, batch_size=16, seed=4, progress=False)
    assert torch.equal(first.matrix, again.matrix) and not torch.equal(first.matrix, other.matrix)
    assert not any(m._forward_hooks for m in model.modules())
    model.eval()


def test_data_loaders_and_data_sets_are_recut_into_the_same_batches(models):
    model, kmodel = models
    x = images(40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    expected = layer_similarity(kmodel, x, images=35, batch_size=16, seed=5, progress=False)
    loader = DataLoader(TensorDataset(x[order], torch.zeros(40)), batch_size=7)  # (images, labels) batches
    from_loader = layer_similarity(kmodel, loader, images=35, batch_size=16, seed=5, progress=False)
    data_set = TensorDataset(x, torch.zeros(40))  # map-style: drawn with the seed, as a tensor is
    from_set = layer_similarity(kmodel, data_set, images=35, batch_size=16, seed=5, progress=False)
    assert expected.images == from_loader.images == from_set.images == 35  # 16 + 19: the 3 left over join in
    torch.testing.assert_close(from_loader.matrix, expected.matrix, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_set.matrix, expected.matrix, rtol=1e-12, atol=1e-12)


def test_layers_pooling_and_dtypes(models, dtype, tol):
    _, kmodel = models
    chosen = ["layer2.1.conv2", "stem.0", "layer1.1.conv1"]
    x = images().float()  # float32 images: layer_similarity casts them to the model's dtype
    try:
        sim = layer_similarity(kmodel.to(dtype), x, chosen, pool="mean", progress=False)
        assert sim.names == ["stem.0", "layer1.1.conv1", "layer2.1.conv2"] and sim.pool == "mean"  # order they run
        full = layer_similarity(kmodel, x, pool="mean", progress=False)
        index = [full.names.index(n) for n in sim.names]
        torch.testing.assert_close(sim.matrix, full.matrix[index][:, index], **tol)
        flat = layer_similarity(kmodel, x, chosen, pool="flatten", progress=False)
        assert not torch.allclose(flat.matrix, sim.matrix, atol=1e-3)
        reference = layer_similarity(kmodel.float(), x, chosen, pool="mean", progress=False)
        torch.testing.assert_close(sim.matrix, reference.matrix, rtol=1e-4, atol=1e-5)  # float32 model: close
    finally:
        kmodel.float()


class NoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("call, needle", [
    (lambda m: layer_similarity(m, images(), ["layer1.0.conv"], progress=False), "'layer1.0.conv1'"),
    (lambda m: layer_similarity(m, images(), [], progress=False), "layers is empty"),
    (lambda m: layer_similarity(m, images(0), progress=False), "no images"),
    (lambda m: layer_similarity(m, images(3), progress=False), "data gave 3 images"),
    (lambda m: layer_similarity(m, images(), images=2, progress=False), "must both be >= 4"),
    (lambda m: layer_similarity(m, images(), pool="max", progress=False), "'flatten'"),
    (lambda m: layer_similarity(m, images()[0], progress=False), "[N, C, H, W]"),
    (lambda m: layer_similarity(m, iter(["a", "b"]), progress=False), "got str"),
    (lambda m: layer_similarity(NoConv(), images(), progress=False), "has no conv module"),
])
def test_layer_similarity_errors_are_clear(models, call, needle):
    with pytest.raises((CKAError, DataError)) as info:  # images of the wrong shape are a DataError
        call(models[0])
    assert needle in str(info.value)


# ---- the result ---------------------------------------------------------------------------------------------------
def test_stages_are_the_shortest_prefix_that_tells_them_apart():
    assert stages(["stem.0", "layer1.0.conv1", "layer1.1.conv2", "layer2.0.down.0"]) == [
        "stem", "layer1", "layer1", "layer2"]
    assert stages(["features.0.0", "features.1.conv.0", "features.1.conv.1"]) == [
        "features.0", "features.1", "features.1"]
    assert stages(["conv"]) == ["conv"]


def test_layer_similarity_result_round_trips_prints_and_plots(tmp_path, models):
    sim = layer_similarity(models[0], images(), progress=False)
    sim.matrix[0, 1] = sim.matrix[1, 0] = math.nan  # a constant layer: kept out of the pairs, None in JSON
    pairs = sim.top_pairs(5)
    assert len(pairs) == 5 and all(a != b for a, b, _ in pairs)
    assert [v for *_, v in pairs] == sorted((v for *_, v in pairs), reverse=True)
    assert (sim.names[0], sim.names[1]) not in [(a, b) for a, b, _ in sim.top_pairs(100)]
    assert sim[pairs[0][0], pairs[0][1]] == pairs[0][2]
    data = json.loads(json.dumps(sim.to_dict()))
    assert data["matrix"][0][1] is None
    again = LayerSimilarity.from_dict(data)
    assert again.names == sim.names and torch.equal(again.matrix.nan_to_num(7), sim.matrix.nan_to_num(7))
    text = str(sim)
    assert pairs[0][0] in text and "flatten pooling" in text and f"{pairs[0][2]:.3f}" in text
    with pytest.raises(CKAError, match="did you mean"):
        sim["stem.1", "stem.0"]
    for path, other in ((tmp_path / "one.png", None), (tmp_path / "two.png", again)):
        sim.plot(path, compare=other)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- `kdna cka` ---------------------------------------------------------------------------------------------------

TINY = ["--model", "resnet18", "--width", "0.0625", "--small-stem"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Fashion-MNIST-like IDX set, a resnet18 state dict and its kdna_fx.save'd transformed twin."""
    root = tmp_path_factory.mktemp("cka")
    data = str(root / "fmnist")
    write_tiny_fashion_mnist(data, n_train=4, n_test=70)
    torch.manual_seed(0)
    model = kdna_fx.models.create_model("resnet18", num_classes=10, in_chans=1, small_stem=True, width=0.0625)
    torch.save(model.state_dict(), root / "weights.pt")
    kdna_fx.save(kdna_fx.transform(model), root / "converted.safetensors")  # records its builder (create_model)
    hand_made = torchvision.models.resnet18(num_classes=10)  # records none: needs --model
    kdna_fx.save(kdna_fx.transform(hand_made), root / "anonymous.safetensors")
    return root, data


def test_cka_command_end_to_end_with_compare(tiny, capsys):
    root, data = tiny
    out = root / "out"
    assert main(["cka", str(root / "weights.pt"), *TINY, "--images", "64", "--data", data,
                 "--compare", str(root / "converted.safetensors"), "--out-dir", str(out), "--no-progress"]) == 0
    assert (out / "cka.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((out / "cka.json").read_text())
    assert result["images"] == 64 and result["pool"] == "flatten" and len(result["names"]) == 20
    assert result["compare"]["names"] == result["names"] and result["compare"]["source"].endswith(".safetensors")
    assert result["model"]["kwargs"]["width"] == 0.0625 and "command" in result["provenance"]
    assert all(result["matrix"][i][i] == 1.0 for i in range(20))
    printed = capsys.readouterr().out
    assert "most similar conv pairs" in printed and "converted.safetensors:" in printed and "cka.json" in printed


def test_cka_command_on_a_model_name_writes_beside_the_working_directory(tiny, monkeypatch, capsys):
    root, data = tiny
    monkeypatch.chdir(root)
    assert main(["cka", "resnet18", "--width", "0.0625", "--small-stem", "--images", "16", "--pool", "mean",
                 "--data", data, "--no-progress"]) == 0
    result = json.loads((root / "cka_resnet18" / "cka.json").read_text())
    assert result["pool"] == "mean" and result["compare"] is None and result["model"]["name"] == "resnet18"


def test_cka_command_bad_inputs_are_clear(tiny, tmp_path, capsys):
    root, data = tiny
    weights = str(root / "weights.pt")
    no_path = [weights, *TINY, "--dataset", "folder", "--data", ""]
    stripped = str(tmp_path / "stripped.pt")  # a training checkpoint without its format key
    torch.save({"model": torch.load(weights, weights_only=True), "config": {}}, stripped)
    cases = [
        ([stripped, *TINY], "whose 'model' holds one"),
        ([str(tmp_path / "nowhere")], "neither a `kdna train` run directory"),
        (["resnet81"], "Did you mean 'resnet18'"),
        ([weights], "needs --model NAME"),
        ([str(root / "anonymous.safetensors")], "needs --model NAME"),
        ([weights, "--model", "resnet18"], "do not fit resnet18"),
        ([weights, *TINY, "--compare", "nothing-here"], "--compare 'nothing-here' is neither"),
        ([weights, *TINY, "--images", "2"], ">= 4"),
        (no_path, "needs root="),
        ([weights, *TINY, "--dataset", "folder", "--data", str(tmp_path)], "ImageFolder"),
        ([weights, *TINY, "--data", str(tmp_path)], "Fashion-MNIST files not found"),
        (["squeezenet1_1"], "cannot run on"),  # torchvision: a 3-channel stem, given 1-channel images
    ]
    for argv, needle in cases:
        args = argv if "--data" in argv else [*argv, "--data", data]
        assert main(["cka", *args, "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2, argv
        assert needle in capsys.readouterr().err, needle


def test_cka_command_takes_a_self_describing_file_alone(tiny, tmp_path, capsys):
    root, data = tiny
    out = tmp_path / "alone"
    assert main(["cka", str(root / "converted.safetensors"), "--images", "16", "--data", data, "--out-dir", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "cka.json").read_text())
    assert result["model"]["name"] == "resnet18.plain" and len(result["names"]) == 20  # the original it rebuilds
