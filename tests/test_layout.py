"""The architecture, checked from the import graph: the library never imports its own public face (so there is
no import cycle through kdna_fx/__init__.py), the commands stand on the library and nothing below them imports
a command, no test imports a private name, and no test or bench file loads a module by path."""
from __future__ import annotations

import ast
import pathlib
import pkgutil

import kdna_fx

ROOT = pathlib.Path(__file__).resolve().parent.parent
# kdna_fx/__main__.py is the entry point of `python -m kdna_fx`: a command itself.
LIBRARY = [p for p in (ROOT / "kdna_fx").rglob("*.py")
           if "cli" not in p.relative_to(ROOT / "kdna_fx").parts and p.name != "__main__.py"]
PASSES = list((ROOT / "passes").rglob("*.py"))
SUBMODULES = {m.name for m in pkgutil.iter_modules(kdna_fx.__path__)} | {"passes"}


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement, relative imports made absolute."""
    return _imports_in(ast.parse(path.read_text()), path)


def _imports_in(tree: ast.AST, path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement under ``tree``, a part of ``path``."""
    package = (["kdna_fx"] + list(path.relative_to(ROOT / "kdna_fx").parts[:-1]) if path.is_relative_to(ROOT / "kdna_fx")
               else ["kdna_fx", "passes"])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_the_library_never_imports_its_public_face():
    offenders = []
    for path in LIBRARY + PASSES:
        for module, names in _imports(path):
            if module == "kdna_fx" and (not names or set(names) - SUBMODULES):
                offenders.append(f"{path.relative_to(ROOT)}: from kdna_fx import {names or '(the package)'}")
    assert not offenders, offenders


def test_nothing_below_the_commands_imports_a_command():
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in LIBRARY + PASSES for m, _ in _imports(p)
                 if m.startswith("kdna_fx.cli")]
    assert not offenders, offenders


def test_the_transform_never_imports_the_zoo():
    # The zoo (kdna_fx.models) builds on the transform: an import the other way is a cycle. What the transform
    # carries from a zoo model (its ModelSpec) goes through kdna_fx.carried.carry_over.
    transform = [ROOT / "kdna_fx" / "api.py", ROOT / "kdna_fx" / "_pipeline.py"] + PASSES
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in transform for m, _ in _imports(p)
                 if m == "kdna_fx.models" or m.startswith("kdna_fx.models.")]
    assert not offenders, offenders


def test_one_reader_of_the_compiled_wrapper():
    # torch.compile's wrapper is looked inside in one place (kdna_fx.carried.unwrapped), with one policy.
    word = "_orig" + "_mod"
    offenders = [str(p.relative_to(ROOT)) for p in LIBRARY + PASSES if p.name != "carried.py"
                 and any(word in line.split("#")[0] and "getattr" in line or f".{word}" in line.split('"')[0]
                         for line in p.read_text().splitlines())]
    assert not offenders, offenders


def test_no_test_or_bench_file_loads_a_module_by_path():
    # Everything shared is imported by name: the library's modules and bench's (bench is a package; the
    # third-party catalogue is bench.thirdparty); a file loaded by path is a module
    # outside the package, which sys.modules, pickle and dataclasses do not know.
    word = "spec_from_" + "file_location"  # split, so this file does not name it
    offenders = [str(p.relative_to(ROOT)) for folder in ("tests", "bench") for p in (ROOT / folder).rglob("*.py")
                 if word in p.read_text()]
    assert not offenders, offenders


def test_no_test_imports_a_private_name():
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        if path.name == "test_layout.py":
            continue
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
            if module.startswith(("kdna_fx", "bench")) and private:
                offenders.append(f"{path.name}: from {module} import {names}")
    assert not offenders, offenders


def test_every_package_directory_is_installed():
    # pyproject lists the packages by hand (passes/ is mapped to kdna_fx.passes); a room left off the list
    # imports from a checkout but not from a wheel.
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("kdna_fx",) + p.parent.relative_to(ROOT / "kdna_fx").parts) for p in (ROOT / "kdna_fx").rglob("__init__.py")}
    found |= {"kdna_fx.passes"}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_no_pass_function_shadows_its_module():
    # `from .fold import fold` in passes/__init__.py would make kdna_fx.passes.fold the function, so the module
    # could only be reached through importlib; the modules are named for what they do (folding.py) instead.
    from kdna_fx import passes
    modules = {m.name for m in pkgutil.iter_modules(passes.__path__)}
    clashes = sorted(name for name in passes.__all__ if name in modules)
    assert not clashes, clashes


def test_a_commands_source_goes_back_up_the_import_order_only_to_build_and_load():
    # kdna eval/convert/cka/export read SOURCE through kdna_fx.source, which imports what it calls at the top; a
    # function-level import on that path is a call back up the import order (issue 34: at most 4 on cka's and
    # convert's way). The two left: ModelSpec.build calls the zoo, kdna_fx.load the transform (and fold).
    on_the_path = ["source.py", "spec.py", "state.py", "data.py", "train/checkpoint.py"]
    found = set()
    for name in on_the_path:
        path = ROOT / "kdna_fx" / name
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef):
                found |= {(name, module) for module, _ in _imports_in(function, path) if module.startswith("kdna_fx")}
    assert found <= {("spec.py", "kdna_fx.models"), ("state.py", "kdna_fx.api"), ("state.py", "kdna_fx.passes")}, found
