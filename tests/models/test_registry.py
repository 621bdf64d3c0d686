"""torchcaps.models._api: register_model, list_models, get_model, get_model_builder."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from torchcaps.models import (
    CapsNet,
    CapsuleOutput,
    _api,
    capsnet_mnist,
    get_model,
    get_model_builder,
    list_models,
    register_model,
)


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are forgotten after it."""
    monkeypatch.setattr(_api, "_BUILDERS", dict(_api._BUILDERS))


def _tiny(**kwargs: Any) -> CapsNet:
    defaults: dict[str, Any] = {"in_shape": (1, 12, 12), "num_classes": 3, "conv_channels": 4}
    return CapsNet(
        **{**defaults, "conv_kernel": 5, "primary_capsules": 2, "primary_kernel": 3, **kwargs}
    )


def test_capsnet_mnist_is_registered() -> None:
    assert "capsnet_mnist" in list_models()
    assert get_model_builder("capsnet_mnist") is capsnet_mnist
    model = get_model("capsnet_mnist")
    assert isinstance(model, CapsNet) and model.in_shape == (1, 28, 28)


def test_register_list_get() -> None:
    decorated = register_model("tiny_test")(_tiny)
    assert decorated is _tiny  # the decorator returns the builder unchanged
    register_model("a_first_test")(_tiny)
    names = list_models()
    assert names == sorted(names) and {"tiny_test", "a_first_test", "capsnet_mnist"} <= set(names)
    assert get_model_builder("tiny_test") is _tiny
    model = get_model("tiny_test")
    assert model.in_shape == (1, 12, 12) and model.num_classes == 3
    assert isinstance(model(torch.rand(2, 1, 12, 12)), CapsuleOutput)


def test_builder_keyword_arguments_override_its_defaults() -> None:
    register_model("tiny_test")(_tiny)
    model = get_model("tiny_test", num_classes=5, class_dim=4, reconstruction=False)
    assert model.num_classes == 5 and model.digits.out_dim == 4 and model.decoder is None
    out = model(torch.rand(2, 1, 12, 12))
    assert out.capsules.shape == (2, 5, 4) and out.reconstruction is None
    # capsnet_mnist's own defaults give way too
    assert get_model("capsnet_mnist", num_classes=7).num_classes == 7


def test_a_name_is_registered_once() -> None:
    register_model("tiny_test")(_tiny)
    with pytest.raises(
        ValueError, match="register_model: a model named 'tiny_test' is already registered"
    ):
        register_model("tiny_test")(capsnet_mnist)
    assert get_model_builder("tiny_test") is _tiny  # the first registration stays
    with pytest.raises(ValueError, match="'capsnet_mnist' is already registered"):
        register_model("capsnet_mnist")(_tiny)


@pytest.mark.parametrize("name", ["", 3, None])
def test_a_name_must_be_a_non_empty_string(name: Any) -> None:
    with pytest.raises(TypeError, match="register_model: name must be a non-empty str"):
        register_model(name)
    assert name not in list_models()


@pytest.mark.parametrize("name", ["capsnet", "CapsNet_MNIST", "", ["capsnet_mnist"]])
def test_unknown_names_list_the_choices(name: Any) -> None:
    register_model("tiny_test")(_tiny)
    assert {"capsnet_mnist", "tiny_test"} <= set(list_models())
    message = re.escape(f"unknown model {name!r}; choices: {list_models()}")
    with pytest.raises(ValueError, match=f"^{message}$"):
        get_model(name)
    with pytest.raises(ValueError, match=f"^{message}$"):
        get_model_builder(name)
