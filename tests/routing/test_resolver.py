"""torchcaps.routing.resolver: names to Routing modules, found among torchcaps.routing's exports."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchcaps.routing
from _strategies import BAD_INTS, RAISED, check_call
from torchcaps import (
    DynamicRouting,
    InvertedDotProductRouting,
    Routing,
    SelfAttentionRouting,
    squash,
)
from torchcaps.routing import (
    resolve_routing,
    routing_algorithms,
    routing_choices,
    routing_class,
)


class MeanRouting(Routing):
    """Uniform coupling (a stand-in for a new algorithm)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n_in, n_out, _ = u_hat.shape
        c = u_hat.new_full((b, n_in, n_out), 1.0 / n_out)
        return squash(self.scale * u_hat.mean(dim=1)), c


@pytest.fixture
def with_mean_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchcaps.routing as if it exported MeanRouting (one file plus one export)."""
    monkeypatch.setattr(torchcaps.routing, "MeanRouting", MeanRouting, raising=False)
    monkeypatch.setattr(torchcaps.routing, "__all__", [*torchcaps.routing.__all__, "MeanRouting"])


@pytest.mark.parametrize(
    "name", ["dynamic", "Dynamic", "DynamicRouting", "dynamic_routing", "dynamic-routing"]
)
def test_resolver_names(name: str) -> None:
    r = resolve_routing(name, iterations=2)
    assert isinstance(r, DynamicRouting) and r.iterations == 2


def test_resolver_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"could not resolve routing 'em'; choices: "
        r"\['dynamic', 'inverted_dot_product', 'self_attention'\]",
    ):
        resolve_routing("em")
    with pytest.raises(TypeError, match="routing must be a Routing instance or a name"):
        resolve_routing(3)  # type: ignore[arg-type]
    inst = DynamicRouting()
    assert resolve_routing(inst) is inst
    with pytest.raises(ValueError, match="routing_kwargs"):
        resolve_routing(inst, iterations=2)
    assert routing_choices() == ["dynamic", "inverted_dot_product", "self_attention"]


def test_routing_class_is_what_resolve_routing_builds() -> None:
    for name in routing_choices():
        cls = routing_class(name)
        kwargs = cls.contract_kwargs(5, 3, 4)
        assert type(resolve_routing(name, **kwargs)) is cls
    assert routing_class("Self-Attention") is routing_class("self_attention_routing")
    with pytest.raises(ValueError, match="could not resolve routing 'em'"):
        routing_class("em")
    with pytest.raises(TypeError, match="got int"):
        routing_class(3)  # type: ignore[arg-type]


def test_algorithms_are_the_exported_routing_subclasses() -> None:
    found = routing_algorithms()
    assert found == {
        "dynamicrouting": DynamicRouting,
        "inverteddotproductrouting": InvertedDotProductRouting,
        "selfattentionrouting": SelfAttentionRouting,
    }
    exported = {getattr(torchcaps.routing, name) for name in torchcaps.routing.__all__}
    assert set(found.values()) <= exported
    assert Routing not in found.values()  # the base class is not an algorithm


def test_a_new_export_is_found_without_a_table(with_mean_routing: None) -> None:
    assert routing_algorithms()["meanrouting"] is MeanRouting
    assert routing_choices() == ["dynamic", "inverted_dot_product", "mean", "self_attention"]
    for name in ("mean", "MeanRouting", "mean_routing"):
        r = resolve_routing(name, scale=2.0)
        assert isinstance(r, MeanRouting) and r.scale == 2.0
    with pytest.raises(ValueError, match=r"choices: \['dynamic', 'inverted_dot_product', 'mean', "):
        resolve_routing("em")


def test_a_subclass_that_is_not_exported_is_not_found() -> None:
    assert "meanrouting" not in routing_algorithms()
    with pytest.raises(ValueError, match="could not resolve routing 'mean'"):
        resolve_routing("mean")


# -- fuzz ----------------------------------------------------------------------------------------
@given(st.data())
def test_fuzz_resolve_routing(data: st.DataObject) -> None:
    broken = data.draw(
        st.sampled_from([None, None, "routing", "routing_kwargs", "iterations"]), label="broken"
    )
    routing: Any = data.draw(
        st.sampled_from(
            [
                "dynamic",
                "Dynamic",
                "DynamicRouting",
                "dynamic-routing",
                "dynamic_routing",
                "DYNAMIC ROUTING",
            ]
        )
    )
    kwargs: dict[str, Any] = data.draw(
        st.sampled_from([{}, {"iterations": 2}, {"stop_gradient": True}])
    )
    kind = ""
    if broken == "routing":
        routing = data.draw(st.sampled_from(["em", "dyn", "", "routing", 1, None, DynamicRouting]))
        kind = repr(routing)
    elif broken == "routing_kwargs":  # kwargs with an instance
        routing, kwargs, kind = DynamicRouting(), {"iterations": 2}, "kwargs with an instance"
    elif broken == "iterations":
        kwargs = {"iterations": data.draw(st.sampled_from(BAD_INTS))}
        kind = repr(kwargs)
    out = check_call("resolve_routing", lambda: resolve_routing(routing, **kwargs), broken, kind)
    if out is RAISED:
        return
    assert isinstance(out, DynamicRouting)
    for key, value in kwargs.items():
        assert getattr(out, key) == value
