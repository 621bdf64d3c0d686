"""Turn a routing name or instance into a :class:`~torchcaps.routing.Routing` module."""

from __future__ import annotations

import re
import sys
from typing import Any

from torchcaps.routing.base import Routing

__all__ = ["resolve_routing", "routing_algorithms", "routing_choices", "routing_class"]


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def routing_algorithms() -> dict[str, type[Routing]]:
    """Every routing algorithm of :mod:`torchcaps.routing`, by its normalised class name.

    Found, not listed by hand: every :class:`Routing` subclass that :mod:`torchcaps.routing`
    exports in its ``__all__``. Adding an algorithm is one file plus one export.

    Examples:
        >>> from torchcaps.routing import routing_algorithms
        >>> routing_algorithms()["dynamicrouting"].__name__
        'DynamicRouting'
    """
    package = sys.modules["torchcaps.routing"]
    found: dict[str, type[Routing]] = {}
    for export in package.__all__:
        obj = getattr(package, export)
        if isinstance(obj, type) and issubclass(obj, Routing) and obj is not Routing:
            found[_normalise(obj.__name__)] = obj
    return found


def routing_choices() -> list[str]:
    """The names :func:`resolve_routing` accepts: class names without ``Routing``, snake_case.

    Examples:
        >>> from torchcaps.routing import routing_choices
        >>> routing_choices()
        ['dynamic', 'inverted_dot_product', 'self_attention']
    """
    names = (
        re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        for cls in routing_algorithms().values()
    )
    return sorted(name.removesuffix("_routing") for name in names)


def routing_class(name: str) -> type[Routing]:
    """The :class:`Routing` subclass that :func:`resolve_routing` builds for ``name``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: no built-in algorithm has that name (the message lists the choices).

    Examples:
        >>> from torchcaps.routing import routing_class
        >>> routing_class("inverted-dot-product").__name__
        'InvertedDotProductRouting'
    """
    if not isinstance(name, str):
        raise TypeError(
            f"routing must be a Routing instance or a name from {routing_choices()}, "
            f"got {type(name).__name__}"
        )
    key = _normalise(name)
    algorithms = routing_algorithms()
    cls = algorithms.get(key) or algorithms.get(key + "routing")
    if cls is None:
        raise ValueError(f"could not resolve routing {name!r}; choices: {routing_choices()}")
    return cls


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
    return routing_class(routing)(**kwargs)
