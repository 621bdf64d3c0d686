"""Routing algorithms between capsule layers, behind one :class:`Routing` interface."""

from torchcaps.routing.base import Routing
from torchcaps.routing.dynamic import DynamicRouting
from torchcaps.routing.inverted_dot_product import InvertedDotProductRouting
from torchcaps.routing.resolver import (
    resolve_routing,
    routing_algorithms,
    routing_choices,
    routing_class,
)
from torchcaps.routing.self_attention import SelfAttentionRouting

__all__ = [
    "DynamicRouting",
    "InvertedDotProductRouting",
    "Routing",
    "SelfAttentionRouting",
    "resolve_routing",
    "routing_algorithms",
    "routing_choices",
    "routing_class",
]
