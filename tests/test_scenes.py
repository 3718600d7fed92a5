"""FashionScenes: the Fashion-MNIST detection and instance-segmentation scenes (bench/scenes.py)."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdna_fx.data import FASHION_MNIST_DIR, DataError
from bench.scenes import FashionScenes, collate, mask_boxes

# Tier integration: make test-fast leaves it out (builds and trains on generated scenes).
pytestmark = pytest.mark.integration

needs_data = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")


def write_split(root, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """IDX .gz files in the Debian package's layout (uint8 images [N, 28, 28], labels [N])."""
    for name, array in ((f"{prefix}-images-idx3-ubyte.gz", images), (f"{prefix}-labels-idx1-ubyte.gz", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
        with gzip.open(os.path.join(root, name), "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def opaque_squares(tmp_path):
    """Garments that are solid 28x28 squares (every pixel nonzero), labels 0-9: occlusion is exact geometry."""
    images = np.full((10, 28, 28), 200, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_split(tmp_path, prefix, images, np.arange(10))
    return str(tmp_path)


def check_scene(image: torch.Tensor, target: dict, scenes: FashionScenes) -> None:
    n = len(target["labels"])
    size = scenes.size
    assert image.shape == (scenes.channels, size, size) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64 and target["masks"].shape == (n, size, size)
    assert target["masks"].dtype == torch.uint8 and set(target["masks"].unique().tolist()) <= {0, 1}
    assert ((1 <= target["labels"]) & (target["labels"] <= 10)).all()
    # Every garment is visible, the masks never overlap, and together they are exactly the lit pixels.
    assert (target["masks"].flatten(1).sum(1) > 0).all()
    assert target["masks"].sum(0).max() <= 1
    assert torch.equal(target["masks"].sum(0).bool(), image[0] > 0)
    # Boxes are the masks' pixel extents (torchvision's masks_to_boxes gives the last pixel, not its far edge).
    from torchvision.ops import masks_to_boxes

    torch.testing.assert_close(target["boxes"], masks_to_boxes(target["masks"]) + torch.tensor([0, 0, 1, 1.0]))
    boxes = target["boxes"]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all() and (boxes[:, 2:] > boxes[:, :2]).all()


@needs_data
def test_scenes_are_valid_and_deterministic():
    scenes = FashionScenes("val", length=40, seed=3)
    counts = set()
    for i in range(len(scenes)):
        image, target = scenes[i]
        check_scene(image, target, scenes)
        assert int(target["image_id"]) == i
        counts.add(len(target["labels"]))
    assert counts <= {1, 2, 3, 4} and len(counts) > 1
    # The same (seed, index) gives the same scene, in any order and from a fresh instance; other seeds differ.
    again = FashionScenes("val", length=40, seed=3)
    for i in (7, 2, 7):
        a, b = scenes[i], again[i]
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert not torch.equal(scenes[0][0], FashionScenes("val", length=40, seed=4)[0][0])
    assert scenes[-1][1]["image_id"] == 39


@needs_data
def test_defaults_and_repr():
    train, val = FashionScenes("train"), FashionScenes("val", channels=3)
    assert (len(train), len(val), train.num_classes) == (60_000, 10_000, 11)
    assert train.classes[0] == "background" and train.classes[1] == "T-shirt/top"
    image, target = val[0]
    check_scene(image, target, val)
    assert torch.equal(image[0], image[2])
    assert repr(train) == ("FashionScenes(split='train', 60,000 scenes of 128x128, 1-4 garments of 20-64 px, "
                           "channels=1, seed=0)")


def test_occlusion_updates_masks_and_boxes_and_drops_hidden_garments(opaque_squares):
    # Three squares of the canvas' own size: each hides the one before it completely.
    covered = FashionScenes("train", size=32, objects=(3, 3), garment_size=(32, 32), length=5, root=opaque_squares)
    for i in range(5):
        image, target = covered[i]
        check_scene(image, target, covered)
        assert len(target["labels"]) == 1 and target["boxes"].tolist() == [[0, 0, 32, 32]]
    # Smaller squares overlap in part: the last one is whole, earlier ones lose what it covers.
    scenes = FashionScenes("train", size=64, objects=(4, 4), garment_size=(30, 30), length=30, root=opaque_squares)
    partly = 0
    for i in range(len(scenes)):
        image, target = scenes[i]
        check_scene(image, target, scenes)
        areas = target["masks"].flatten(1).sum(1)
        assert areas[-1] == 30 * 30 and (areas <= 30 * 30).all()
        partly += int((areas < 30 * 30).any())
    assert partly > 0


def test_bad_arguments_are_refused(opaque_squares):
    for kwargs, match in [({"split": "test"}, "split"), ({"objects": (0, 2)}, "objects"),
                          ({"objects": (3, 1)}, "objects"), ({"objects": 2}, "objects"),
                          ({"garment_size": (20, 200)}, "size"), ({"garment_size": (0, 10)}, "garment_size"),
                          ({"channels": 2}, "channels"), ({"length": 0}, "length"), ({"seed": -1}, "seed")]:
        with pytest.raises(DataError, match=match):
            FashionScenes(**{"root": opaque_squares, **kwargs})
    with pytest.raises(DataError, match="not found"):
        FashionScenes(root=os.path.join(opaque_squares, "nowhere"))
    scenes = FashionScenes(length=3, root=opaque_squares)
    with pytest.raises(IndexError):
        scenes[3]
    with pytest.raises(TypeError):
        scenes[1.0]
    with pytest.raises(DataError, match="empty"):
        mask_boxes(torch.zeros(1, 4, 4))


def test_feeds_a_torchvision_detector_training_step(opaque_squares):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    scenes = FashionScenes("train", size=64, garment_size=(12, 32), length=8, root=opaque_squares)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 2, 1))
    backbone.out_channels = 8
    model = MaskRCNN(backbone, min_size=64, max_size=64, image_mean=[0.0],
                     image_std=[1.0], rpn_anchor_generator=AnchorGenerator(((16, 32),), ((1.0,),)),
                     box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                     box_predictor=FastRCNNPredictor(1024, scenes.num_classes), mask_head=MaskRCNNHeads(8, [8], 1),
                     mask_predictor=MaskRCNNPredictor(8, 8, scenes.num_classes))
    images, targets = next(iter(DataLoader(scenes, batch_size=4, collate_fn=collate)))
    assert isinstance(images, list) and len(images) == len(targets) == 4
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    before = backbone[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, backbone[0].weight)
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}
    assert collate([]) == ([], [])
