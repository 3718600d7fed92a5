"""The zoo registry and ``create_model``, the one resolver of model names (docs/models.md).

A name is ``<arch>.<tag>`` for a zoo architecture (``resnet18.kdna``), or ``torchvision/<name>[.<tag>]`` /
``timm/<name>[.<tag>]`` for any model those libraries build (without weights). An architecture is registered
once (``register_arch``); its variants are tags:

- ``plain``: the ordinary network (the default: ``resnet18`` is ``resnet18.plain``);
- ``replace``: ``kdna_fx.transform`` of it with the architecture's ``sharing_config``;
- ``relaxed``: replace mode whose children carry a rank-``rank`` kernel residual (``AdapterConfig.rank``,
  default ``RELAXED_RANK``);
- ``kdna``: the KernelDNA reference topology (zoo architectures only);
- one tag per peer: the ``kdna_fx.peers`` transform of the plain network.

The tags are data (``TAGS``, as timm's ``split_model_name_tag`` reads a name: ``<arch>.<tag>``): each says which
options it takes and how it finishes the network; adding one is one line there.

The names of the v0.1 zoo (``kdna_resnet18``, ``replace_resnet50``, ``kdna_mobilenet_v2_050``) are aliases.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from torch import nn

from ..config import KDNAConfig
from ..errors import ConfigError, KDNATypeError
from ..spec import stamp

RELAXED_RANK = 4
"""The default ``rank`` of the ``relaxed`` tag: each child's kernel residual B A, B [C_out, rank]."""
SOURCES = ("torchvision", "timm")
"""Libraries ``create_model`` builds from by name: ``torchvision/<name>``, ``timm/<name>``."""


class Reference(NamedTuple):
    """A KernelDNA reference topology: the plain network, the families the plan names, and the config."""

    net: nn.Module
    families: list[dict[str, Any]]
    config: KDNAConfig


@dataclass(frozen=True)
class Arch:
    """One zoo architecture. ``plain(**options)`` builds the plain network (its signature is the options of
    every tag but ``kdna``); ``reference(**options)`` the parts of the ``kdna`` tag (None: no such tag).

    The rest describes the networks to timm (kdna_fx.models.timm): the modules whose outputs are the feature
    stages (of the plain network, and of the reference topology's network), the stem conv and the classifier.
    """

    name: str
    plain: Callable[..., nn.Module]
    reference: Callable[..., Reference] | None = None
    sharing: Callable[[], KDNAConfig] = KDNAConfig
    plain_features: tuple[str, ...] = ()
    reference_features: tuple[str, ...] = ()
    first_conv: str = "conv1"
    classifier: str = "fc"
    peer_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Default options of a peer tag on this architecture (the caller's options win)."""


_ARCHS: dict[str, Arch] = {}
_ALIASES: dict[str, str] = {}


def register_arch(arch: Arch, aliases: Sequence[str] = ()) -> Arch:
    """Register ``arch`` and its tags; ``aliases`` are extra names of the plain network. The v0.1 names
    ``replace_<arch>`` and ``kdna_<arch>`` become aliases of the ``replace`` and ``kdna`` tags."""
    if arch.name in _ARCHS or "." in arch.name or "/" in arch.name:
        raise ConfigError(f"cannot register architecture {arch.name!r}: taken, or a '.' or '/' in the name")
    _ARCHS[arch.name] = arch
    _ALIASES[f"replace_{arch.name}"] = f"{arch.name}.replace"
    if arch.reference is not None:
        _ALIASES[f"kdna_{arch.name}"] = f"{arch.name}.kdna"
    for alias in aliases:
        _ALIASES[alias] = f"{arch.name}.plain"
    return arch


def architectures() -> dict[str, Arch]:
    """The registered zoo architectures by name."""
    return dict(_ARCHS)


# ---- names ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """A parsed model name: ``source`` is "zoo", "torchvision" or "timm"; ``base`` the architecture."""

    source: str
    base: str
    tag: str

    @property
    def name(self) -> str:
        """The canonical name (what a ModelSpec records)."""
        if self.source == "zoo":
            return f"{self.base}.{self.tag}"
        return f"{self.source}/{self.base}" + ("" if self.tag == "plain" else f".{self.tag}")

    @property
    def arch(self) -> Arch | None:
        return _ARCHS.get(self.base) if self.source == "zoo" else None


def resolve(name: str) -> Resolved:
    """Parse ``name`` (an alias, ``<arch>[.<tag>]`` or ``<source>/<name>[.<tag>]``); builds nothing."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a model name is a non-empty string, got {name!r}")
    name = _ALIASES.get(name, name)
    if "/" in name:
        source, _, rest = name.partition("/")
        if source not in SOURCES:
            raise ConfigError(f"unknown model source {source!r} in {name!r}: use torchvision/<name> or "
                              f"timm/<name> (or a kdna_fx.models zoo name without a '/')")
        base, dot, tag = rest.rpartition(".")
        if not dot or tag not in tags(None):  # no tag of ours: a timm name may carry its own pretrained tag
            base, tag = rest, "plain"
        if not base:
            raise ConfigError(f"model name {name!r} has no architecture after {source}/")
        return Resolved(source, base, tag)
    base, _, tag = name.partition(".")
    tag = tag or "plain"
    arch = _ARCHS.get(base)
    if arch is None:
        known = list_models() + sorted(_ALIASES)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} Zoo models: {', '.join(list_models())}; any torchvision "
                          f"or timm model as torchvision/<name> or timm/<name>")
    if tag not in tags(arch):
        raise ConfigError(f"{base} has no tag {tag!r}; its tags: {', '.join(tags(arch))}")
    return Resolved("zoo", base, tag)


def is_model(name: object) -> bool:
    """Whether ``create_model`` resolves ``name`` (a zoo name or alias, or a torchvision/timm name; a name of
    torchvision or timm is checked when it is built)."""
    try:
        resolve(name)  # type: ignore[arg-type]
    except ConfigError:
        return False
    return True


def list_models(pattern: str = "*", *, aliases: bool = False) -> list[str]:
    """Sorted ``<arch>.<tag>`` names of the zoo, filtered by a shell-style ``pattern`` (``"*.kdna"``, say);
    ``aliases=True`` adds the v0.1 names (``kdna_resnet18``, ...)."""
    names = [f"{a.name}.{t}" for a in _ARCHS.values() for t in tags(a)] + (list(_ALIASES) if aliases else [])
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


# ---- options --------------------------------------------------------------------------------------------
def _params(fn: Callable[..., Any], skip: int = 0) -> list[str]:
    return list(inspect.signature(fn).parameters)[skip:]


def model_options(name: str) -> list[str]:
    """The options ``create_model(name, ...)`` takes. For a torchvision or timm model, the tag's own options
    and ``num_classes`` (the library checks the rest)."""
    resolved = resolve(name)
    tag = TAGS[resolved.tag]
    if resolved.arch is None:
        return ["num_classes"] + tag.own_options()
    return _params(tag.maker(resolved.arch)) + tag.own_options()


def sharing_config(name: str) -> KDNAConfig:
    """The KDNAConfig that the ``replace`` tag, the peers and ``kdna convert`` use when given none.

    ``name`` may be any zoo name or alias; MobileNetV2 shares its 1x1 convs and ConvNeXt its depthwise 7x7
    convs, since neither has plain 3x3 convs to share. Any other name (a torchvision or timm model, say) gets
    ``KDNAConfig()``: same-shaped 3x3 convs of each stage.
    """
    arch = resolve(name).arch if is_model(name) else None
    return arch.sharing() if arch is not None else KDNAConfig()


# ---- tags ----------------------------------------------------------------------------------------------
Finish = Callable[[nn.Module, nn.Module], nn.Module]
BuildNet = Callable[..., nn.Module]


class Recipe(NamedTuple):
    """How a name is built: the network, then ``finish`` applied to it (or to a wrapper of it, such as
    timm's feature extractor: ``finish(wrapper, net)`` finds the network's convs in the wrapper by identity)."""

    net: nn.Module
    finish: Finish


@dataclass(frozen=True)
class Tag:
    """A variant of a network: ``finish(resolved, options)`` turns the tag's own ``options`` into what is done to
    the built network (None: nothing). ``peer``: the kdna_fx.peers function a peer tag applies (its options are
    that function's); ``reference``: the network is the architecture's KernelDNA reference topology."""

    options: tuple[str, ...] = ()
    finish: Callable[[Resolved, dict[str, Any]], Finish] | None = None
    peer: str | None = None
    reference: bool = False

    def offered(self, arch: Arch | None) -> bool:
        """Whether ``arch`` (None: a torchvision or timm model) has this tag."""
        if self.reference:
            return arch is not None and arch.reference is not None
        return self.peer is None or self.peer_function() is not None

    def peer_function(self) -> Callable[..., nn.Module] | None:
        """The kdna_fx.peers function of a peer tag (None where kdna_fx.peers has none)."""
        from .. import peers

        return getattr(peers, self.peer, None) if self.peer is not None else None

    def own_options(self) -> list[str]:
        """The options that belong to the tag (the rest go to the network)."""
        peer = self.peer_function()
        return _params(peer, skip=1) if peer is not None else list(self.options)

    def maker(self, arch: Arch) -> Callable[..., Any]:
        """The zoo builder this tag starts from (its signature: the network's options)."""
        return arch.reference if self.reference else arch.plain  # type: ignore[return-value]

    def recipe(self, resolved: Resolved, options: dict[str, Any], net_kwargs: dict[str, Any],
               build_net: BuildNet) -> Recipe:
        """The network built through ``build_net(make, **net_kwargs)`` and this tag's finish."""
        if self.reference:
            return _reference_recipe(resolved, net_kwargs, build_net)
        # The tag's options are checked (by finish) before anything is built.
        finish = _peer_finish(self, resolved, options) if self.peer else \
            self.finish(resolved, options) if self.finish else lambda model, base: model
        return Recipe(build_net(_maker(resolved), **net_kwargs), finish)


def _reference_recipe(resolved: Resolved, net_kwargs: dict[str, Any], build_net: BuildNet) -> Recipe:
    """The reference builder gives (net, families, config): the net goes through build_net (timm wraps it for
    features_only), the plan and config wait for finish."""
    parts: list[Reference] = []

    def make_reference(**kw: Any) -> nn.Module:
        parts.append(resolved.arch.reference(**kw))  # type: ignore[union-attr]
        return parts[-1].net

    net = build_net(make_reference, **net_kwargs)
    ref = parts[-1]
    return Recipe(net, lambda model, base: _with_plan(model, base, ref.families, ref.config))


def _replaced(resolved: Resolved, options: dict[str, Any]) -> Finish:
    config = _config(resolved, options.get("config"), options.get("gate_norm"))
    return lambda model, base: _replace(model, base, config)


def _relaxed(resolved: Resolved, options: dict[str, Any]) -> Finish:
    rank = _relaxed_rank(resolved, options.get("rank", RELAXED_RANK))
    config = _config(resolved, options.get("config"), options.get("gate_norm"))
    relaxed = config.map_adapters(lambda a: dataclasses.replace(a, rank=rank))
    return lambda model, base: _replace(model, base, relaxed)


def _peer_finish(tag: Tag, resolved: Resolved, options: dict[str, Any]) -> Finish:
    """The peer function on the plain network, converting the convs the architecture's sharing config names,
    with the architecture's defaults for the peer (the caller's options win)."""
    peer = tag.peer_function()
    if "config" in _params(peer):  # type: ignore[arg-type]
        options = {**options, "config": _config(resolved, options.get("config"), None)}
    if resolved.arch is not None:
        options = {**resolved.arch.peer_options.get(resolved.tag, {}), **options}
    return lambda model, base: peer(model, **options)  # type: ignore[misc]


TAGS: dict[str, Tag] = {
    "plain": Tag(),
    "replace": Tag(("config", "gate_norm"), _replaced),
    "kdna": Tag(reference=True),
    "relaxed": Tag(("config", "gate_norm", "rank"), _relaxed),
    **{name: Tag(peer=name) for name in ("condconv", "dyconv", "odconv", "kernelwarehouse")},
}
"""Every tag, in the order ``list_models`` shows them: a new peer is one ``Tag(peer=<kdna_fx.peers function>)``
line; a tag whose function kdna_fx.peers does not have is not offered."""


def tags(arch: Arch | None = None) -> list[str]:
    """The tags of a zoo architecture (``arch``) or of a torchvision/timm model (None), default first."""
    return [name for name, tag in TAGS.items() if tag.offered(arch)]


# ---- building --------------------------------------------------------------------------------------------
def recipe(name: str, kwargs: dict[str, Any], build_net: Callable[..., nn.Module] | None = None) -> Recipe:
    """The recipe of ``create_model(name, **kwargs)``. ``build_net(make, **options)`` builds the network
    from its maker (default: ``make(**options)``; kdna_fx.models.timm passes timm's own builder)."""
    resolved = resolve(name)
    arch = resolved.arch
    options = model_options(name) if arch is not None else None
    if options is not None:
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise KDNATypeError(f"{resolved.name} does not take option(s) {unknown}; it takes {options}"
                                + _other_tags_hint(resolved, unknown))
    tag = TAGS[resolved.tag]
    own = set(tag.own_options())
    tag_kwargs = {k: v for k, v in kwargs.items() if k in own}
    net_kwargs = {k: v for k, v in kwargs.items() if k not in own}
    return tag.recipe(resolved, tag_kwargs, net_kwargs, build_net or (lambda make, **kw: make(**kw)))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` freshly initialised, without weights: a zoo name (``list_models()``, an alias,
    ``resnet18.kdna``), or ``torchvision/<name>[.<tag>]`` / ``timm/<name>[.<tag>]``.

    Zoo architectures take ``num_classes``, ``in_chans``, ``small_stem`` and ``width`` (see docs/models.md);
    ``replace`` takes ``config`` and ``gate_norm``, ``relaxed`` those and ``rank`` (default ``RELAXED_RANK``,
    an integer >= 1 or ``"full"``), a peer tag its ``kdna_fx.peers`` function's options.
    The model records how it was built (``kdna_fx.models.spec_of``), so ``kdna_fx.load(path)`` can
    rebuild it.
    """
    resolved = resolve(name)
    net, finish = recipe(name, kwargs)
    return stamp(finish(net, net), resolved.name, kwargs)


def _relaxed_rank(resolved: Resolved, rank: Any) -> int | str:
    """The ``rank`` option of the ``relaxed`` tag, checked: a one-line ConfigError that names the fix."""
    if rank == "full" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        return rank
    replace = resolved.name.rpartition(".")[0] + ".replace"
    raise ConfigError(f"{resolved.name}: rank must be an integer >= 1 or 'full' (each child's kernel residual "
                      f"rank; default {RELAXED_RANK}), got {rank!r}; for no residual use {replace}")


def _other_tags_hint(resolved: Resolved, unknown: list[str]) -> str:
    """Where the unknown options belong, when another tag of the same architecture takes them all."""
    arch = resolved.arch
    if arch is None:
        return ""
    takers = [f"{arch.name}.{t}" for t in tags(arch) if t != resolved.tag
              and set(unknown) <= set(model_options(f"{arch.name}.{t}"))]
    return f" (use {' or '.join(takers)})" if takers else ""


def _maker(resolved: Resolved) -> Callable[..., nn.Module]:
    """The builder of the plain network of a resolved name."""
    if resolved.arch is not None:
        return resolved.arch.plain
    if resolved.source == "torchvision":
        return lambda **kw: _torchvision(resolved.base, **kw)
    return lambda **kw: _timm(resolved.base, **kw)


def _torchvision(base: str, **kwargs: Any) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if base not in known:
        close = difflib.get_close_matches(base, known, n=3)
        raise ConfigError(f"torchvision has no model {base!r}" + (f"; did you mean {close}?" if close else ""))
    return torchvision.models.get_model(base, weights=None, **kwargs)


def _timm(base: str, **kwargs: Any) -> nn.Module:
    import timm

    if kwargs.pop("pretrained", False):
        raise ConfigError("kdna_fx.models builds models without weights; load a checkpoint afterwards")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        raise ConfigError(f"timm has no model {base!r}" + (f"; did you mean {close}?" if close else ""))
    return timm.create_model(base, pretrained=False, **kwargs)


def _config(resolved: Resolved, config: Any, gate_norm: Any) -> KDNAConfig:
    """The tag's KDNAConfig: the given one, else the architecture's sharing; ``gate_norm`` set on every
    adapter when given."""
    if config is not None and not isinstance(config, KDNAConfig):
        raise KDNATypeError(f"config must be a kdna_fx.KDNAConfig or None, got {type(config).__name__}")
    config = config if config is not None else (resolved.arch.sharing() if resolved.arch else KDNAConfig())
    if gate_norm is not None:  # AdapterConfig checks the value
        config = config.map_adapters(lambda a: dataclasses.replace(a, gate_norm=gate_norm))
    return config


def _renamed(model: nn.Module, base: nn.Module, families: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``families`` (names in ``base``) named as in ``model``, a wrapper holding base's modules (timm's
    feature extractor renames and drops modules); families left without a parent or child are dropped."""
    if model is base:
        return families
    where = {id(m): n for n, m in model.named_modules()}
    old = dict(base.named_modules())
    out = []
    for family in families:
        parent = where.get(id(old[family["parent"]]))
        children = [where[id(old[c])] for c in family["children"] if id(old[c]) in where]
        if parent is not None and children:
            out.append({"parent": parent, "children": children})
    return out


def _with_plan(model: nn.Module, base: nn.Module, families: list[dict[str, Any]], config: KDNAConfig) -> nn.Module:
    from ._common import with_plan

    return with_plan(model, _renamed(model, base, families), config)


def _replace(model: nn.Module, base: nn.Module, config: KDNAConfig) -> nn.Module:
    """``transform(model, config)``; a wrapper of ``base`` gets the families planned on ``base`` itself (the
    wrapper's module names may split a stage)."""
    from ..api import plan, transform

    if model is base:
        return transform(model, config)
    families = [{"parent": f.parent, "children": list(f.children)} for f in plan(base, config).families]
    return _with_plan(model, base, families, config)
