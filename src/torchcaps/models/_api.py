"""The model registry and the output every registered model returns.

Builders register under a name with :func:`register_model`; :func:`get_model` builds one by name
and :func:`list_models` lists the names, as in ``torchvision.models``.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from torchcaps._checks import check_int, check_shape, check_tensor

__all__ = ["CapsuleOutput", "get_model", "get_model_builder", "list_models", "register_model"]


class CapsuleOutput(NamedTuple):
    """What the ``forward(x, target=None)`` of every registered model returns.

    A :class:`~typing.NamedTuple`, so ``torch.compile``, ``torch.export`` and the ONNX exporter
    treat it as a tuple of its fields (``None`` fields are dropped from an exported graph). The
    fields: ``scores``, the class scores, whose argmax is the prediction (for
    :class:`~torchcaps.models.CapsNet` the lengths of the class capsules); ``capsules``, the
    class capsules, or ``None`` for a model without capsules (the baseline CNN);
    ``reconstruction``, the decoder's output, masked by the target when one is
    given and by the prediction otherwise, or ``None`` for a model without decoder.

    Shape:
        - scores: :math:`(B, K)`.
        - capsules: :math:`(B, K, D)`, or ``None``.
        - reconstruction: :math:`(B, *)`, the input's shape, or ``None``.

    Examples:
        >>> import torch
        >>> from torchcaps.models import CapsuleOutput
        >>> out = CapsuleOutput(torch.zeros(2, 10), torch.zeros(2, 10, 16), None)
        >>> scores, capsules, reconstruction = out  # a tuple
        >>> out.scores.shape, out.reconstruction is None
        (torch.Size([2, 10]), True)
    """

    scores: Tensor
    capsules: Tensor | None
    reconstruction: Tensor | None


Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register a model builder under ``name`` (a decorator).

    The builder takes keyword arguments only and returns an :class:`~torch.nn.Module` whose
    ``forward(x, target=None)`` returns a :class:`CapsuleOutput`, with the attributes
    ``in_shape`` (the shape of one input) and ``num_classes``.
    :func:`torchcaps.testing.assert_model_contract` checks such a model.

    Args:
        name: the name :func:`get_model` knows the builder by (unique).

    Raises:
        ValueError: ``name`` is taken.

    Examples:
        >>> from torchcaps.models import CapsNet, get_model, register_model
        >>> @register_model("capsnet_tiny")
        ... def capsnet_tiny(**kwargs):
        ...     return CapsNet(in_shape=(1, 20, 20), conv_channels=16, primary_capsules=4, **kwargs)
        >>> get_model("capsnet_tiny").in_shape
        (1, 20, 20)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_model: name must be a non-empty str, got {name!r}")

    def wrapper(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"register_model: a model named {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return wrapper


def list_models() -> list[str]:
    """The names of the registered models, sorted.

    Examples:
        >>> from torchcaps.models import list_models
        >>> "capsnet_mnist" in list_models()
        True
    """
    return sorted(_BUILDERS)


def get_model_builder(name: str) -> Builder:
    """The builder registered as ``name``; :class:`ValueError` listing the choices otherwise."""
    try:
        return _BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choices: {list_models()}") from None


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    Args:
        name: one of :func:`list_models`.
        **kwargs: passed to the builder (they override its defaults).

    Raises:
        ValueError: ``name`` is not registered (the message lists the choices).

    Examples:
        >>> from torchcaps.models import get_model
        >>> model = get_model("capsnet_mnist", reconstruction=False)
        >>> sum(p.numel() for p in model.parameters())
        6804224
    """
    return get_model_builder(name)(**kwargs)


def check_image_model_args(
    owner: str, in_shape: Any, num_classes: Any, reconstruction: Any
) -> tuple[tuple[int, int, int], int]:
    """Validate the arguments every image model takes; return ``(in_shape, num_classes)``."""
    if not isinstance(in_shape, Sequence) or len(in_shape) != 3:
        raise TypeError(f"{owner}: in_shape must be a triple (C, H, W), got {in_shape!r}")
    c, h, w = (check_int(f"in_shape[{i}]", s, owner=owner) for i, s in enumerate(in_shape))
    if not isinstance(reconstruction, bool):
        raise TypeError(
            f"{owner}: reconstruction must be a bool, got {type(reconstruction).__name__}"
        )
    return (c, h, w), check_int("num_classes", num_classes, owner=owner)


def check_images(x: Any, in_shape: tuple[int, int, int], owner: str) -> None:
    """``x`` must be a float batch of images of ``in_shape``."""
    check_tensor("x", x, owner=owner)
    c, h, w = in_shape
    check_shape(x, "B C H W", name="x", owner=owner, C=c, H=h, W=w)
