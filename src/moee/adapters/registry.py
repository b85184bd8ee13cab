"""Adapters by name: each lists the MLP blocks of a model it understands."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moee.adapters.site import MLPSite, validate_site
from moee.errors import ConfigError, NoMLPBlocksError
from moee.util.modes import eval_mode

Finder = Callable[[nn.Module], list[MLPSite]]
_ADAPTERS: dict[str, Finder] = {}  # in registration order: more specific layouts first


def register_adapter(name: str):
    """Decorator: register `finder(model) -> list[MLPSite]` under `name` (tried after the
    built-in ones unless named explicitly)."""

    def wrap(finder: Finder) -> Finder:
        _ADAPTERS[name] = finder
        return finder

    return wrap


def _first_match(model: nn.Module, adapter: str | None) -> tuple[str, list[MLPSite]]:
    """(name, sites) of the first adapter (or the one named) that finds MLP blocks."""
    if adapter is not None and adapter not in _ADAPTERS:
        raise ConfigError(f"adapter: unknown {adapter!r}; registered: {list_adapters()}")
    for name in [adapter] if adapter is not None else list(_ADAPTERS):
        sites = _ADAPTERS[name](model)
        if sites:
            return name, sites
    raise NoMLPBlocksError(
        f"No MLP blocks found in {type(model).__name__}. moee recognises these layouts: "
        f"{list_adapters()}. Register an adapter for others (moee.register_adapter).")


def adapter_of(model: nn.Module, adapter: str | None = None) -> str:
    """The adapter `find_mlp_sites(model, adapter)` uses."""
    return _first_match(model, adapter)[0]


def list_adapters() -> list[str]:
    """Registered adapter names, in the order `find_mlp_sites` tries them."""
    return list(_ADAPTERS)


def find_mlp_sites(model: nn.Module, adapter: str | None = None,
                   validate: bool = True) -> list[MLPSite]:
    """MLP blocks of `model` in forward order, from the first adapter (or the one named) that
    finds any. With `validate`, every block is checked on a probe: the adapter's MLP must
    reproduce the block's own output, else AdapterMismatchError names the block."""
    name, sites = _first_match(model, adapter)
    if validate:
        with eval_mode(model):  # dropout off for the probe
            for site in sites:
                validate_site(site, name)
    return sites
