"""bench.thirdparty, the test and bench catalogue of third-party CNNs: importing it imports none of their
libraries, and a missing library is a clear error that names the pip extra."""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from bench import thirdparty

LIBRARIES = ("segmentation_models_pytorch", "monai", "transformers", "ultralytics", "efficientnet_pytorch")


@pytest.mark.integration  # a fresh interpreter importing torch
def test_importing_kdna_fx_and_the_catalogue_imports_none_of_the_libraries() -> None:
    code = ("import sys, kdna_fx, bench.thirdparty as t; assert len(t.BUILDERS) > 20; "
            f"print(sorted(m for m in {LIBRARIES!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)  # bench is found from the root
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_tables_agree() -> None:
    names = set(thirdparty.ENTRIES)
    for table in (thirdparty.BUILDERS, thirdparty.EXAMPLE_INPUTS, thirdparty.LIBRARY, thirdparty.MODULE,
                  thirdparty.NOTES):
        assert set(table) == names
    assert thirdparty.LIBRARY["smp-unet-resnet18"] == "segmentation-models-pytorch"
    assert thirdparty.MODULE["smp-unet-resnet18"] == "segmentation_models_pytorch"


def test_a_missing_library_names_the_pip_extra(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "monai" else real(name, *a))
    assert not thirdparty.available("monai-unet")
    with pytest.raises(ModuleNotFoundError, match=r"needs monai .*pip install 'kdna_fx\[thirdparty\]'") as err:
        thirdparty.BUILDERS["monai-unet"]()
    assert "\n" not in str(err.value) and err.value.name == "monai"


def test_a_catalogue_model_builds_and_runs() -> None:
    pytest.importorskip("timm")
    model = thirdparty.BUILDERS["timm-resnet18"]().eval()
    assert model(*thirdparty.EXAMPLE_INPUTS["timm-resnet18"]()).shape == (2, 10)
