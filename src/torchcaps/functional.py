r"""Functional forms of the capsule operations.

Every module in :mod:`torchcaps` is a thin wrapper around one of these functions, for users who
prefer functions. They follow `Sabour et al. 2017 <https://arxiv.org/abs/1710.09829>`_.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torchcaps._checks import (
    check_choice,
    check_float,
    check_index_tensor,
    check_indices_in_range,
    check_shape,
    check_tensor,
    float32_compute,
    is_compiling,
    shape_str,
)
from torchcaps.errors import ShapeError

__all__ = [
    "capsule_lengths",
    "exp_squash",
    "margin_loss",
    "mask_capsules",
    "reconstruction_loss",
    "spread_loss",
    "squash",
]

REDUCTIONS = ("mean", "sum", "none")


def _check_dim(x: Tensor, dim: int, *, name: str, owner: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{owner}: dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ShapeError(f"{owner}: {name} must have at least 1 dimension, got shape ()")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{owner}: dim must be in [{-x.dim()}, {x.dim() - 1}] for input of shape "
            f"{shape_str(x.shape)}, got {dim}"
        )
    return dim


def squash(s: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    r"""Squash capsule vectors to length < 1, keeping their direction: equation 1 of the paper.

    .. math::
        v = \frac{\|s\|^2}{1 + \|s\|^2} \frac{s}{\|s\|}

    It is evaluated as :math:`v = s / (n + 1/n)` with :math:`n = \sqrt{\|s\|^2 + \epsilon}`,
    which equals the formula above for :math:`\epsilon = 0`. With :math:`\epsilon > 0` the value
    *and* the gradient are finite at :math:`s = 0` (where :math:`v = 0`), for tiny norms and for
    huge ones (norms up to about :math:`10^{18}` in float32), where the naive form gives NaN.
    Half-precision inputs (float16, bfloat16, e.g. under :func:`torch.autocast`) are computed in
    float32 and returned in the input's dtype.

    Args:
        s: capsule vectors.
        dim: dimension that holds each capsule's vector.
        eps: added to :math:`\|s\|^2` inside the square root; must be > 0.

    Returns:
        The squashed vectors, same shape and dtype as ``s``.

    Shape:
        - Input: :math:`(*, D, *)` with the capsule dimension at ``dim``.
        - Output: same as input.

    Examples:
        >>> import torch
        >>> from torchcaps.functional import squash
        >>> v = squash(torch.randn(2, 10, 16))
        >>> v.shape
        torch.Size([2, 10, 16])
        >>> bool((v.norm(dim=-1) < 1).all())
        True
        >>> squash(torch.tensor([3.0, 4.0]))  # |s| = 5 -> |v| = 25/26
        tensor([0.5769, 0.7692])
    """
    check_tensor("s", s, owner="squash")
    dim = _check_dim(s, dim, name="s", owner="squash")
    check_float("eps", eps, minimum=0.0, strict_min=True, owner="squash")
    x = float32_compute(s)
    sq = x.square().sum(dim=dim, keepdim=True)
    # clamp: an eps below the dtype's smallest normal number would underflow to 0 at s = 0
    n = torch.sqrt((sq + eps).clamp_min(torch.finfo(x.dtype).tiny))
    v = x / (n + 1.0 / n)
    return v.to(s.dtype)


def exp_squash(s: Tensor, dim: int = -1, eps: float = 1e-20) -> Tensor:
    r"""Efficient-CapsNet's squash: length :math:`1 - e^{-\|s\|}`, direction kept.

    From `Mazzia et al. 2021 <https://arxiv.org/abs/2101.12491>`_:

    .. math::
        v = \Big(1 - \frac{1}{e^{\|s\|} + \epsilon}\Big) \frac{s}{\|s\| + \epsilon}

    It saturates faster than :func:`squash` (:math:`\|v\| = 0.63` at :math:`\|s\| = 1`
    against 0.5). Evaluated through :math:`e^{-\|s\|}`, which never overflows, and a norm
    scaled by the largest component, so the value and the gradient are finite at :math:`s = 0`
    (where :math:`v = 0`), for tiny norms and for huge ones (norms up to about :math:`10^{37}`
    in float32, far beyond where :math:`e^{\|s\|}` and :math:`\|s\|^2` overflow).
    Half-precision inputs are computed in float32 and returned in the input's dtype.

    Args:
        s: capsule vectors.
        dim: dimension that holds each capsule's vector.
        eps: :math:`\epsilon` of the formula; must be > 0.

    Returns:
        The squashed vectors, same shape and dtype as ``s``.

    Shape:
        - Input: :math:`(*, D, *)` with the capsule dimension at ``dim``.
        - Output: same as input.

    Examples:
        >>> import torch
        >>> from torchcaps.functional import exp_squash
        >>> v = exp_squash(torch.tensor([3.0, 4.0]))  # |s| = 5 -> |v| = 1 - e^-5
        >>> v, round(float(v.norm()), 4)
        (tensor([0.5960, 0.7946]), 0.9933)
        >>> exp_squash(torch.zeros(2, 4)).abs().sum().item()
        0.0
    """
    check_tensor("s", s, owner="exp_squash")
    dim = _check_dim(s, dim, name="s", owner="exp_squash")
    check_float("eps", eps, minimum=0.0, strict_min=True, owner="exp_squash")
    x = float32_compute(s)
    # The norm of x / max|x|, scaled back: no overflow of the squares up to the dtype's largest
    # value, no underflow for tiny vectors; the gradient of the norm at s = 0 is 0.
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    n = scale * torch.linalg.vector_norm(x / scale, dim=dim, keepdim=True)
    decay = torch.exp(-n)
    # 1 - 1/(e^n + eps) written with e^-n: (1 - e^-n + eps e^-n) / (1 + eps e^-n)
    length = (-torch.expm1(-n) + eps * decay) / (1.0 + eps * decay)
    v = x * (length / (n + eps))  # the ratio first: length * x underflows for tiny s
    return v.to(s.dtype)


def capsule_lengths(v: Tensor, dim: int = -1) -> Tensor:
    r"""Euclidean length of each capsule: the probability that its entity is present.

    .. math::
        \ell_j = \|v_j\|_2

    The gradient at a zero-length capsule is zero (not NaN). Half-precision inputs are computed
    in float32 and returned in the input's dtype.

    Args:
        v: capsule vectors.
        dim: dimension that holds each capsule's vector.

    Shape:
        - Input: :math:`(B, K, D)` (any shape with the capsule dimension at ``dim``).
        - Output: :math:`(B, K)`, the input shape without ``dim``.

    Examples:
        >>> import torch
        >>> from torchcaps.functional import capsule_lengths
        >>> capsule_lengths(torch.tensor([[[3.0, 4.0], [0.0, 0.0]]]))
        tensor([[5., 0.]])
    """
    check_tensor("v", v, owner="capsule_lengths")
    dim = _check_dim(v, dim, name="v", owner="capsule_lengths")
    return torch.linalg.vector_norm(float32_compute(v), dim=dim).to(v.dtype)


def _target_to_onehot(target: Tensor, lengths: Tensor, *, owner: str) -> Tensor:
    """Turn class indices (B,) or a multi-hot (B, K) target into a float (B, K) tensor."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{owner}: target must be a torch.Tensor, got {type(target).__name__}")
    batch, k = lengths.shape
    if target.dim() == 1:
        if target.shape[0] != batch:
            raise ShapeError(
                f"{owner}: target of class indices must have shape ({batch},) to match lengths "
                f"of shape {shape_str(lengths.shape)}, got {shape_str(target.shape)}"
            )
        check_index_tensor("target", target, owner=owner)
        check_indices_in_range("target", target, k, owner=owner)
        return F.one_hot(target.long(), k).to(lengths.dtype)
    if target.dim() == 2:
        if tuple(target.shape) != (batch, k):
            raise ShapeError(
                f"{owner}: multi-hot target must have shape {shape_str(lengths.shape)} like "
                f"lengths, got {shape_str(target.shape)}"
            )
        if target.is_complex():
            raise TypeError(f"{owner}: target must be real (0/1 entries), got {target.dtype}")
        if not is_compiling() and target.numel() > 0:
            bad = (target != 0) & (target != 1)
            if bool(bad.any()):
                raise ValueError(
                    f"{owner}: multi-hot target must contain only 0 and 1, got values "
                    f"{torch.unique(target[bad])[:5].tolist()}"
                )
        return target.to(lengths.dtype)
    raise ShapeError(
        f"{owner}: target must be class indices of shape ({batch},) or a multi-hot tensor of "
        f"shape {shape_str(lengths.shape)}, got {shape_str(target.shape)}"
    )


def _reduce(loss: Tensor, reduction: str, *, owner: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{owner}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def margin_loss(
    lengths: Tensor,
    target: Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lambda_: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    r"""Margin loss of the paper (equation 4), summed over classes per sample.

    .. math::
        L = \sum_k T_k \max(0, m^+ - \ell_k)^2
            + \lambda (1 - T_k) \max(0, \ell_k - m^-)^2

    where :math:`T_k = 1` iff class :math:`k` is present. Computed in float32 for
    half-precision inputs.

    Args:
        lengths: capsule lengths :math:`\ell`, e.g. from :func:`capsule_lengths`.
        target: class indices, or a multi-hot {0, 1} tensor when several classes are present.
        m_pos: margin :math:`m^+` a present class's length should exceed.
        m_neg: margin :math:`m^-` an absent class's length should stay below.
        lambda_: down-weighting :math:`\lambda` of absent classes.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for per-sample losses.

    Shape:
        - lengths: :math:`(B, K)`.
        - target: :math:`(B,)` integer class indices in :math:`[0, K)`, or :math:`(B, K)` multi-hot.
        - Output: scalar, or :math:`(B,)` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from torchcaps.functional import margin_loss
        >>> lengths = torch.tensor([[0.95, 0.05], [0.5, 0.6]])
        >>> margin_loss(lengths, torch.tensor([0, 1]), reduction="none")
        tensor([0.0000, 0.1700])
    """
    owner = "margin_loss"
    check_tensor("lengths", lengths, owner=owner)
    check_shape(lengths, "B K", name="lengths", owner=owner, note=" with K >= 1 classes")
    check_float("m_pos", m_pos, owner=owner)
    check_float("m_neg", m_neg, owner=owner)
    check_float("lambda_", lambda_, minimum=0.0, owner=owner)
    check_choice("reduction", reduction, REDUCTIONS, owner=owner)
    x = float32_compute(lengths)
    t = _target_to_onehot(target, x, owner=owner)
    present = t * F.relu(m_pos - x).square()
    absent = lambda_ * (1.0 - t) * F.relu(x - m_neg).square()
    loss = (present + absent).sum(dim=1)
    return _reduce(loss, reduction, owner=owner).to(
        torch.promote_types(lengths.dtype, torch.float32)
    )


def spread_loss(
    activations: Tensor, target: Tensor, margin: float = 0.2, reduction: str = "mean"
) -> Tensor:
    r"""Spread loss of matrix capsules (Hinton et al. 2018), summed over the wrong classes.

    .. math::
        L = \sum_{i \ne t} \max\big(0, m - (a_t - a_i)\big)^2

    per sample, with :math:`a_t` the activation of the target class: every wrong class whose
    activation is not at least :math:`m` below the target's is penalised quadratically. The
    paper raises :math:`m` from 0.2 to 0.9 during training (:func:`torchcaps.spread_margin`).
    Computed in float32 for half-precision inputs.

    Args:
        activations: class activations :math:`a`, e.g. of a class-capsule layer.
        target: class indices.
        margin: :math:`m`.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for per-sample losses.

    Shape:
        - activations: :math:`(B, K)`.
        - target: :math:`(B,)` integer class indices in :math:`[0, K)`.
        - Output: scalar, or :math:`(B,)` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from torchcaps.functional import spread_loss
        >>> a = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.5, 0.4]])
        >>> spread_loss(a, torch.tensor([0, 1]), margin=0.2, reduction="none")  # 0.1**2; 0.1**2
        tensor([0.0100, 0.0100])
    """
    owner = "spread_loss"
    check_tensor("activations", activations, owner=owner)
    check_shape(activations, "B K", name="activations", owner=owner, note=" with K >= 1 classes")
    check_float("margin", margin, owner=owner)
    check_choice("reduction", reduction, REDUCTIONS, owner=owner)
    if not isinstance(target, Tensor):
        raise TypeError(f"{owner}: target must be a torch.Tensor, got {type(target).__name__}")
    batch, k = activations.shape
    check_shape(
        target,
        "B",
        name="target",
        owner=owner,
        note=" (one class index per row of activations)",
        B=batch,
    )
    check_index_tensor("target", target, owner=owner)
    check_indices_in_range("target", target, k, owner=owner)
    a = float32_compute(activations)
    a_t = a.gather(1, target.long().unsqueeze(1))
    wrong = 1.0 - F.one_hot(target.long(), k).to(a.dtype)
    loss = (wrong * F.relu(margin - (a_t - a)).square()).sum(dim=1)
    return _reduce(loss, reduction, owner=owner).to(
        torch.promote_types(activations.dtype, torch.float32)
    )


def mask_capsules(v: Tensor, target: Tensor | None = None) -> Tensor:
    r"""Zero every capsule but one per sample (the decoder's input mask).

    Args:
        v: capsule vectors.
        target: index of the capsule to keep per sample (e.g. the true class while training);
            ``None`` keeps each sample's longest capsule (the prediction).

    Shape:
        - v: :math:`(B, K, D)`.
        - target: :math:`(B,)` integer indices in :math:`[0, K)`, or ``None``.
        - Output: :math:`(B, K, D)`, zero except the selected capsule of each sample.

    Examples:
        >>> import torch
        >>> from torchcaps.functional import mask_capsules
        >>> v = torch.tensor([[[0.1, 0.0], [0.0, 0.9]]])
        >>> mask_capsules(v)  # keeps the longest capsule
        tensor([[[0.0000, 0.0000],
                 [0.0000, 0.9000]]])
        >>> mask_capsules(v, torch.tensor([0]))
        tensor([[[0.1000, 0.0000],
                 [0.0000, 0.0000]]])
    """
    owner = "mask_capsules"
    check_tensor("v", v, owner=owner)
    shape = check_shape(
        v, "B K D", name="v", owner=owner, empty_ok=("B", "D"), note=" with K >= 1 capsules"
    )
    batch, k = shape["B"], shape["K"]
    if target is None:
        index = torch.linalg.vector_norm(float32_compute(v), dim=-1).argmax(dim=-1)
    else:
        if not isinstance(target, Tensor):
            raise TypeError(
                f"{owner}: target must be a torch.Tensor or None, got {type(target).__name__}"
            )
        check_shape(target, "B", name="target", owner=owner, B=batch)
        check_index_tensor("target", target, owner=owner)
        check_indices_in_range("target", target, k, owner=owner)
        index = target.long()
    mask = F.one_hot(index, k).to(v.dtype)
    return v * mask.unsqueeze(-1)


def reconstruction_loss(
    reconstruction: Tensor,
    target: Tensor,
    weight: float = 0.0005,
    reduction: str = "mean",
) -> Tensor:
    r"""Weighted per-image *sum* of squared errors, as in the paper.

    .. math::
        L_{rec} = w \sum_{p} (\hat{x}_p - x_p)^2

    summed over all pixels :math:`p` of each image, then reduced over the batch. The paper's
    weight is :math:`w = 0.0005`, equivalent to :math:`0.392` times the per-pixel mean for
    28x28 images. (Public implementations differ here: averaging over pixels with the same
    weight makes the term 784 times weaker.) Computed in float32 for half-precision inputs.

    Args:
        reconstruction: decoder output :math:`\hat{x}`.
        target: the images :math:`x`, same shape.
        weight: :math:`w`, must be >= 0.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for per-sample losses.

    Shape:
        - reconstruction: :math:`(B, *)`.
        - target: :math:`(B, *)`, same shape as ``reconstruction``.
        - Output: scalar, or :math:`(B,)` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from torchcaps.functional import reconstruction_loss
        >>> x = torch.zeros(2, 1, 28, 28)
        >>> reconstruction_loss(torch.ones(2, 1, 28, 28), x)  # 0.0005 * 784
        tensor(0.3920)
    """
    owner = "reconstruction_loss"
    check_tensor("reconstruction", reconstruction, owner=owner)
    check_tensor("target", target, owner=owner)
    if reconstruction.dim() < 1:
        raise ShapeError(f"{owner}: reconstruction must have shape (B, *), got shape ()")
    if reconstruction.shape != target.shape:
        raise ShapeError(
            f"{owner}: target must have the shape of reconstruction "
            f"{shape_str(reconstruction.shape)}, got {shape_str(target.shape)}"
        )
    check_float("weight", weight, minimum=0.0, owner=owner)
    check_choice("reduction", reduction, REDUCTIONS, owner=owner)
    diff = float32_compute(reconstruction) - float32_compute(target)
    per_image = diff.square().flatten(1).sum(dim=1) if diff.dim() > 1 else diff.square()
    out = _reduce(weight * per_image, reduction, owner=owner)
    out_dtype = torch.promote_types(reconstruction.dtype, target.dtype)
    return out.to(torch.promote_types(out_dtype, torch.float32))
