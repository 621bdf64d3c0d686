"""Turn a routing name or instance into a :class:`~torchcaps.routing.Routing` module."""

from __future__ import annotations

from typing import Any

from torchcaps.routing.base import Routing
from torchcaps.routing.dynamic import DynamicRouting

__all__ = ["resolve_routing", "routing_choices"]

_REGISTRY: dict[str, type[Routing]] = {"dynamicrouting": DynamicRouting}


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def routing_choices() -> list[str]:
    """The names :func:`resolve_routing` accepts (without the ``Routing`` suffix)."""
    return sorted(key.removesuffix("routing") for key in _REGISTRY)


def resolve_routing(routing: str | Routing, **kwargs: Any) -> Routing:
    """Resolve ``routing`` to a :class:`Routing` instance.

    A :class:`Routing` instance is returned as it is (then ``kwargs`` must be empty). A string is
    matched case-insensitively, ignoring ``-`` and ``_``, against the class names of the built-in
    algorithms with or without the ``Routing`` suffix, and the class is built with ``kwargs``.

    Args:
        routing: a name such as ``"dynamic"`` or ``"DynamicRouting"``, or an instance.
        **kwargs: constructor arguments for a named algorithm.

    Examples:
        >>> from torchcaps.routing import resolve_routing
        >>> resolve_routing("dynamic")
        DynamicRouting(iterations=3)
        >>> resolve_routing("Dynamic-Routing", iterations=1)
        DynamicRouting(iterations=1)
    """
    if isinstance(routing, Routing):
        if kwargs:
            raise ValueError(
                f"routing_kwargs {sorted(kwargs)} can only be used with a routing name, "
                f"got an instance of {type(routing).__name__}"
            )
        return routing
    if not isinstance(routing, str):
        raise TypeError(
            f"routing must be a Routing instance or a name from {routing_choices()}, "
            f"got {type(routing).__name__}"
        )
    key = _normalise(routing)
    cls = _REGISTRY.get(key) or _REGISTRY.get(key + "routing")
    if cls is None:
        raise ValueError(f"could not resolve routing {routing!r}; choices: {routing_choices()}")
    return cls(**kwargs)
