"""Turn a routing name or instance into a routing module.

Two families, each with its own contract: :class:`~torchcaps.routing.Routing` (prediction
vectors in, parent capsules out) and :class:`~torchcaps.routing.MatrixRouting` (votes and
activations in, poses and activations out). The algorithms of each are found, not listed: every
subclass that :mod:`torchcaps.routing` exports in its ``__all__``.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TypeVar

from torchcaps.routing.base import Routing
from torchcaps.routing.matrix import MatrixRouting

__all__ = [
    "matrix_routing_algorithms",
    "matrix_routing_choices",
    "resolve_matrix_routing",
    "resolve_routing",
    "routing_algorithms",
    "routing_choices",
    "routing_class",
]

_R = TypeVar("_R", Routing, MatrixRouting)


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def _algorithms(base: type[_R]) -> dict[str, type[_R]]:
    package = sys.modules["torchcaps.routing"]
    found: dict[str, type[_R]] = {}
    for export in package.__all__:
        obj = getattr(package, export)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base:
            found[_normalise(obj.__name__)] = obj
    return found


def _snake_case(name: str) -> str:
    """Class name to snake case; acronyms stay whole: ``EMRouting`` -> ``em_routing``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _choices(base: type[_R]) -> list[str]:
    names = (_snake_case(cls.__name__) for cls in _algorithms(base).values())
    return sorted(name.removesuffix("_routing") for name in names)


def _class(name: Any, base: type[_R]) -> type[_R]:
    if not isinstance(name, str):
        raise TypeError(
            f"routing must be a {base.__name__} instance or a name from {_choices(base)}, "
            f"got {type(name).__name__}"
        )
    key = _normalise(name)
    algorithms = _algorithms(base)
    cls = algorithms.get(key) or algorithms.get(key + "routing")
    if cls is None:
        raise ValueError(f"could not resolve routing {name!r}; choices: {_choices(base)}")
    return cls


def _resolve(routing: Any, base: type[_R], kwargs: dict[str, Any]) -> _R:
    if isinstance(routing, base):
        if kwargs:
            raise ValueError(
                f"routing_kwargs {sorted(kwargs)} can only be used with a routing name, "
                f"got an instance of {type(routing).__name__}"
            )
        return routing
    return _class(routing, base)(**kwargs)


def routing_algorithms() -> dict[str, type[Routing]]:
    """Every :class:`Routing` algorithm of :mod:`torchcaps.routing`, by normalised class name.

    Found, not listed by hand: every :class:`Routing` subclass that :mod:`torchcaps.routing`
    exports in its ``__all__``. Adding an algorithm is one file plus one export.

    Examples:
        >>> from torchcaps.routing import routing_algorithms
        >>> routing_algorithms()["dynamicrouting"].__name__
        'DynamicRouting'
    """
    return _algorithms(Routing)


def routing_choices() -> list[str]:
    """The names :func:`resolve_routing` accepts: class names without ``Routing``, snake_case.

    Examples:
        >>> from torchcaps.routing import routing_choices
        >>> routing_choices()
        ['dynamic', 'inverted_dot_product', 'self_attention']
    """
    return _choices(Routing)


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
    return _class(name, Routing)


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
    return _resolve(routing, Routing, kwargs)


def matrix_routing_algorithms() -> dict[str, type[MatrixRouting]]:
    """Every :class:`MatrixRouting` algorithm of :mod:`torchcaps.routing`, by class name.

    Found as :func:`routing_algorithms` finds the :class:`Routing` ones.

    Examples:
        >>> from torchcaps.routing import matrix_routing_algorithms
        >>> matrix_routing_algorithms()["emrouting"].__name__
        'EMRouting'
    """
    return _algorithms(MatrixRouting)


def matrix_routing_choices() -> list[str]:
    """The names :func:`resolve_matrix_routing` accepts.

    Examples:
        >>> from torchcaps.routing import matrix_routing_choices
        >>> matrix_routing_choices()
        ['em']
    """
    return _choices(MatrixRouting)


def resolve_matrix_routing(routing: str | MatrixRouting, **kwargs: Any) -> MatrixRouting:
    """Resolve ``routing`` to a :class:`MatrixRouting` instance, as :func:`resolve_routing`.

    Examples:
        >>> from torchcaps.routing import resolve_matrix_routing
        >>> routing = resolve_matrix_routing("em", out_capsules=5, iterations=2)
        >>> type(routing).__name__, routing.out_capsules, routing.iterations
        ('EMRouting', 5, 2)
    """
    return _resolve(routing, MatrixRouting, kwargs)
