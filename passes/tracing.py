"""Symbolic tracing into a GraphModule that keeps every parameter and buffer of the model: read for the order of
the convs (passes.routing) and lowered to the graph form (passes.lowering)."""
from __future__ import annotations

import inspect
import os
import traceback

import torch
from torch import fx, nn

from kdna_fx.carried import KDNAGraphModule
from kdna_fx.config import KDNAConfig
from kdna_fx.errors import KDNATraceError
from kdna_fx import datamodel
from kdna_fx.registry import NOT_TRACED


class _Tracer(fx.Tracer):
    # Defaults: torch.fx rebuilds a pickled GraphModule by tracing its code with ``_Tracer()``.
    reads_children = True
    """kdna_fx's own trace keeps each child's parent-kernel reference exact (ChildAdapter.parent_kernel refuses
    any other torch.fx trace: graph passes such as BatchNorm fusion would rewrite that kernel under the children)."""

    def __init__(self, leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, config: KDNAConfig | None = None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx; never raises a raw torch.fx error.

    Modules in kdna_fx.registry.NOT_TRACED and ``config.leaf_modules`` stay opaque. Parameters and
    buffers the graph does not read (a BatchNorm's num_batches_tracked, an unused head) are copied on
    purpose, so the state dict keeps every entry of the original, and so are the modules' plain attributes
    (``hidden_state_size``, ``out_channels``): code outside the graph may read them.
    """
    config = config or KDNAConfig()
    tracer = _Tracer(tuple(NOT_TRACED) + tuple(config.leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - every tracing failure becomes one documented error
        raise _trace_error(tracer, model, exc) from exc
    gm = KDNAGraphModule(tracer.root, graph, type(model).__name__)  # what kdna_fx leaves on it travels with it
    _copy_untraced_state(model, gm)
    _copy_plain_attributes(model, gm)
    gm.training = model.training  # gm.train() would set the mode of every module it shares with the model
    return gm


# Frames of torch's tracing machinery and of kdna_fx's own library code are never "the model's code"; the
# model zoo (kdna_fx/models) is model code like any other.
_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")
_OWN_DIRS = {os.path.dirname(os.path.abspath(f)) for f in (datamodel.__file__, __file__)}


def _is_model_code(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not path.startswith(_TORCH_DIR) and os.path.dirname(path) not in _OWN_DIRS


def _source(exc: Exception, module: nn.Module) -> str:
    """Where tracing broke, in the model's own code: the innermost frame that is neither torch nor kdna_fx,
    else (the failure came from torch before any model code ran) the first line of the module's forward."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_model_code(f.filename)]
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno} `{(frames[-1].line or '').strip()}`"
    try:
        forward = inspect.unwrap(type(module).forward)
        lines, number = inspect.getsourcelines(forward)
        return f"{inspect.getsourcefile(forward)}:{number} `{lines[0].strip()}`"
    except (OSError, TypeError):  # defined in C or in a string: nothing to point at
        return ""


def _trace_error(tracer: _Tracer, model: nn.Module, exc: Exception) -> KDNATraceError:
    if tracer.module_stack:
        name, module_type = next(reversed(tracer.module_stack.values()))
    else:
        name, module_type = "", type(model)
    type_name = getattr(module_type, "__name__", str(module_type))
    source = _source(exc, model.get_submodule(name))
    where = f" at {source}" if source else ""
    operation = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    shown = f"'{name}' ({type_name})" if name else f"the model's own forward ({type_name})"
    fix = (f"keep it opaque with kdna_fx.KDNAConfig(leaf_modules=({type_name},)) (its convolutions are then "
           f"not shared)" if name else "wrap the untraceable part in a submodule and list it in "
           "kdna_fx.KDNAConfig(leaf_modules=...)")
    message = (f"kdna_fx could not trace {shown}: {type(exc).__name__}: {operation}{where}.\n"
               f"torch.fx symbolic tracing cannot follow Python control flow that depends on tensor values "
               f"(if/while on a tensor, len() of a tensor, calling .item()).\n"
               f"Fix: {fix}, or make that forward free of data-dependent Python control flow; "
               f"KDNAConfig(rewrite='auto') (the default) shares such a model's convs without a graph.")
    return KDNATraceError(message, module_name=name, module_type=type_name, operation=operation, source=source)


def _copy_untraced_state(model: nn.Module, gm: fx.GraphModule) -> None:
    # A module registered under several paths (MONAI's DynUNet) stays one object under all of them: copied
    # tensor by tensor, its weights would look tied to another module.
    mine = {id(m): m for _, m in gm.named_modules()}
    for path, module in model.named_modules(remove_duplicate=False):
        if not path or id(module) not in mine:
            continue
        try:
            gm.get_submodule(path)
        except AttributeError:
            *above, leaf = path.split(".")
            owner: nn.Module = gm
            for part in above:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.add_module(leaf, module)
    present = set(gm.state_dict(keep_vars=True))
    for name, value in model.state_dict(keep_vars=True).items():
        if name in present:
            continue
        *path, leaf = name.split(".")
        owner: nn.Module = gm
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)


def _copy_plain_attributes(model: nn.Module, gm: fx.GraphModule) -> None:
    """Copy the plain (non-module, non-tensor) attributes of ``model`` and of its traced-through submodules.

    A GraphModule keeps only what its graph reads, while code outside the graph (a training script, a
    library's helper) may read such an attribute (``model.num_classes``, ``self.update_block.hidden_state_size``).
    What the GraphModule already has (its graph, its code, a leaf module itself) is never overwritten.
    """
    for name, module in model.named_modules():
        try:
            target = gm.get_submodule(name)
        except AttributeError:
            continue  # neither called nor holding state: the graph has no module there
        if target is module:
            continue  # a leaf: the module itself
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training" or hasattr(target, key):
                continue
            object.__setattr__(target, key, value)
