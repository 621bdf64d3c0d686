"""Routing algorithms between capsule layers, behind one :class:`Routing` interface."""

from torchcaps.routing.base import Routing
from torchcaps.routing.dynamic import DynamicRouting
from torchcaps.routing.resolver import resolve_routing, routing_algorithms, routing_choices

__all__ = ["DynamicRouting", "Routing", "resolve_routing", "routing_algorithms", "routing_choices"]
