"""Every dotted ``kdna_fx...`` path that README.md and docs/ name resolves, by attribute access from the package,
as a user would type it (so a function that shadows its module, or a name that is not exported, fails here)."""
from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench" / "results").glob("*/README.md"))]
PATH = re.compile(r"\bkdna_fx(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _named() -> list[tuple[str, str]]:
    found = {(m.group(0).rstrip("."), doc.relative_to(ROOT).as_posix()) for doc in DOCS
             for m in PATH.finditer(doc.read_text())}
    return sorted(found)


def _resolves(path: str) -> bool:
    """``kdna_fx.a.b``: attribute access from the package, importing a submodule only where no attribute of that
    name exists (as ``import kdna_fx.a`` then ``kdna_fx.a.b`` would)."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:  # a submodule not imported by its package (a function of that name would shadow it above)
            obj = importlib.import_module(".".join(parts[:i + 1]))
        except ImportError:
            return False
    return True


def test_the_docs_name_paths_at_all():
    assert len(_named()) > 50


@pytest.mark.parametrize("path, doc", _named())
def test_every_documented_path_resolves(path, doc):
    assert _resolves(path), f"{doc} names {path}, which does not resolve from the package"


def test_the_check_fails_on_a_missing_name_and_on_a_shadowed_module(monkeypatch):
    assert not _resolves("kdna_fx.no_such_name")
    assert not _resolves("kdna_fx.reporting.no_such_function")
    import kdna_fx

    # kdna_fx.report is a function; had its module kept the name, kdna_fx.report.count_macs would fail to resolve
    monkeypatch.setattr(kdna_fx, "reporting", kdna_fx.report)
    assert not _resolves("kdna_fx.reporting.count_macs")


def test_the_public_face_is_small_documented_and_shadows_no_module():
    import pkgutil

    import kdna_fx

    names = kdna_fx.__all__
    errors = [n for n in names if isinstance(getattr(kdna_fx, n), type) and issubclass(getattr(kdna_fx, n), BaseException)]
    assert len(names) - len(errors) <= 25, "the face beyond its errors and warnings has grown; see issue 24"
    assert all(getattr(kdna_fx, n).__doc__ for n in names), [n for n in names if not getattr(kdna_fx, n).__doc__]
    modules = {m.name for m in pkgutil.iter_modules(kdna_fx.__path__)}
    assert not modules & set(names), f"a public name shadows a module: {sorted(modules & set(names))}"
    readme = (ROOT / "README.md").read_text()
    assert not [n for n in names if f"kdna_fx.{n}" not in readme and n not in readme], "undocumented public names"
