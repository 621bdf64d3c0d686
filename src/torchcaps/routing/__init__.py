"""Routing algorithms between capsule layers, behind one :class:`Routing` interface."""

from torchcaps.routing.base import Routing
from torchcaps.routing.dynamic import DynamicRouting
from torchcaps.routing.em import EMRouting
from torchcaps.routing.inverted_dot_product import InvertedDotProductRouting
from torchcaps.routing.matrix import MatrixRouting
from torchcaps.routing.resolver import (
    matrix_routing_algorithms,
    matrix_routing_choices,
    resolve_matrix_routing,
    resolve_routing,
    routing_algorithms,
    routing_choices,
    routing_class,
)
from torchcaps.routing.self_attention import SelfAttentionRouting

__all__ = [
    "DynamicRouting",
    "EMRouting",
    "InvertedDotProductRouting",
    "MatrixRouting",
    "Routing",
    "SelfAttentionRouting",
    "matrix_routing_algorithms",
    "matrix_routing_choices",
    "resolve_matrix_routing",
    "resolve_routing",
    "routing_algorithms",
    "routing_choices",
    "routing_class",
]
