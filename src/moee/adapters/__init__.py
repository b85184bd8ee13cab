"""Where the MLP blocks are, per layout. The core only sees `MLPSite`s.

An adapter is registered under a name and lists the MLP blocks of a model it understands;
`find_mlp_sites` tries each registered adapter in turn (or the one named) and checks every
block it finds on a probe.
"""

from moee.adapters import layouts as _layouts  # noqa: F401  (registers the built-in adapters)
from moee.adapters.registry import adapter_of, find_mlp_sites, list_adapters, register_adapter
from moee.adapters.site import (
    MLPSite,
    MLPWeights,
    entry_input,
    linear_weights,
    validate_site,
)
from moee.errors import NoMLPBlocksError

BUILTIN_ADAPTERS = frozenset(list_adapters())  # moee's own, tested on every family they name

__all__ = ["BUILTIN_ADAPTERS", "MLPSite", "MLPWeights", "NoMLPBlocksError", "adapter_of",
           "entry_input", "find_mlp_sites", "linear_weights", "list_adapters",
           "register_adapter", "validate_site"]
