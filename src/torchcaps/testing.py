"""Public test helpers: the contracts of routing algorithms and of registered models."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from torchcaps.routing.base import Routing
from torchcaps.routing.matrix import MatrixRouting

__all__ = ["assert_matrix_routing_contract", "assert_model_contract", "assert_routing_contract"]


def _call(routing: torch.nn.Module, u_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    v = routing(u_hat)
    out = routing(u_hat, return_coupling=True)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise AssertionError(
            f"{type(routing).__name__}(u_hat, return_coupling=True) must return a pair (v, c), "
            f"got {type(out).__name__}"
        )
    return v, out[0], out[1]


def assert_routing_contract(
    routing: Routing,
    *,
    batch: int = 3,
    in_capsules: int = 7,
    out_capsules: int = 4,
    dim: int = 5,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    r"""Check that ``routing`` follows the :class:`~torchcaps.routing.Routing` contract.

    Raises :class:`AssertionError` naming the first broken rule. Checked on random prediction
    vectors :math:`\hat{u}` of shape ``(batch, in_capsules, out_capsules, dim)``:

    1. ``routing(u_hat)`` returns ``v`` of shape ``(B, N_out, D)`` in ``u_hat``'s dtype, finite;
    2. ``routing(u_hat, return_coupling=True)`` returns ``(v, c)`` with the same ``v`` and
       ``c`` of shape ``(B, N_in, N_out)``, non-negative and summing to 1 over the parents
       (unless the routing declares ``couplings_sum_to_one = False``, e.g. for a learned prior
       added after a softmax), and every output capsule is at
       most of length 1 (unless it declares ``squashes_output = False``);
    3. the examples of a batch are routed independently (routing one example alone gives the
       same result as routing it inside the batch);
    4. gradients flow from ``v`` back to ``u_hat`` and are finite;
    5. malformed ``u_hat`` (wrong rank, integer dtype) raises :class:`ValueError` or
       :class:`TypeError`.

    A routing algorithm with learned parameters of a fixed size must be built for
    ``(in_capsules, out_capsules)``.

    Args:
        routing: the routing module to check.
        batch: batch size :math:`B` of the probe input.
        in_capsules: :math:`N_{in}` of the probe input.
        out_capsules: :math:`N_{out}` of the probe input.
        dim: :math:`D` of the probe input.
        dtype: dtype of the probe input.
        device: device of the probe input.
        atol: absolute tolerance of the comparisons.
        seed: seed of the probe input.

    Examples:
        >>> from torchcaps import DynamicRouting
        >>> from torchcaps.testing import assert_routing_contract
        >>> assert_routing_contract(DynamicRouting(iterations=3))  # passes silently
    """
    name = type(routing).__name__
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, in_capsules, out_capsules, dim)
    u_hat = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    u_hat.requires_grad_(True)

    v, v2, c = _call(routing, u_hat)
    if tuple(v.shape) != (batch, out_capsules, dim):
        raise AssertionError(
            f"{name}: v must have shape {(batch, out_capsules, dim)}, got {tuple(v.shape)}"
        )
    if v.dtype != u_hat.dtype:
        raise AssertionError(f"{name}: v must have u_hat's dtype {u_hat.dtype}, got {v.dtype}")
    if not bool(torch.isfinite(v).all()):
        raise AssertionError(f"{name}: v has non-finite values for finite u_hat")
    if not torch.allclose(v, v2, atol=atol, rtol=0):
        raise AssertionError(f"{name}: v differs between return_coupling=False and True")
    if tuple(c.shape) != (batch, in_capsules, out_capsules):
        raise AssertionError(
            f"{name}: c must have shape {(batch, in_capsules, out_capsules)}, got {tuple(c.shape)}"
        )
    if getattr(routing, "couplings_sum_to_one", True):
        if bool((c < -atol).any()):
            raise AssertionError(f"{name}: coupling coefficients must be >= 0")
        ones = torch.ones(batch, in_capsules, dtype=c.dtype, device=c.device)
        if not torch.allclose(
            c.sum(dim=-1), ones, atol=max(atol, 1e-3 if dtype != torch.float64 else atol)
        ):
            raise AssertionError(f"{name}: coupling coefficients must sum to 1 over the parents")
    if getattr(routing, "squashes_output", True):
        lengths = torch.linalg.vector_norm(v.detach().double(), dim=-1)
        if bool((lengths > 1 + max(atol, 1e-6)).any()):
            raise AssertionError(
                f"{name}: output capsules must be shorter than 1 (squashed); a routing whose "
                "outputs are not squashed declares squashes_output = False"
            )

    for k in range(batch):
        v_k = routing(u_hat[k : k + 1])
        if not torch.allclose(v_k[0], v[k], atol=atol * 10, rtol=1e-4):
            raise AssertionError(
                f"{name}: example {k} routed alone differs from the batch: "
                "batch elements must be independent"
            )

    grad: Tensor | None = None
    if v.requires_grad:  # a v outside the autograd graph: autograd.grad itself would raise
        (grad,) = torch.autograd.grad(v.square().sum(), u_hat, allow_unused=True)
    if grad is None:
        raise AssertionError(f"{name}: no gradient flows from v back to u_hat")
    if not bool(torch.isfinite(grad).all()):
        raise AssertionError(f"{name}: gradient of v w.r.t. u_hat is not finite")

    rank3 = torch.zeros(batch, in_capsules, out_capsules, dtype=dtype, device=device)
    integer = torch.zeros(shape, dtype=torch.int64, device=device)
    _raises_value_or_type_error(name, "rank-3 u_hat", lambda: routing(rank3))
    _raises_value_or_type_error(name, "integer u_hat", lambda: routing(integer))


def _raises_value_or_type_error(name: str, what: str, call: Callable[[], object]) -> None:
    try:
        call()
    except (ValueError, TypeError):
        return
    except Exception as exc:
        raise AssertionError(
            f"{name}: {what} must raise ValueError/TypeError, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"{name}: {what} must raise ValueError/TypeError, nothing was raised")


def assert_matrix_routing_contract(
    routing: MatrixRouting,
    *,
    batch: int = 3,
    in_capsules: int = 7,
    out_capsules: int = 4,
    pose_dim: int = 16,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    r"""Check that ``routing`` follows the :class:`~torchcaps.routing.MatrixRouting` contract.

    Raises :class:`AssertionError` naming the first broken rule. Checked on random votes of
    shape ``(batch, in_capsules, out_capsules, pose_dim)`` and activations in (0, 1):

    1. ``routing(votes, activations)`` returns ``(poses, activations)`` of shapes
       ``(B, N_out, P)`` and ``(B, N_out)`` in the votes' dtype, finite, activations in [0, 1];
    2. with ``return_coupling=True`` also ``R`` of shape ``(B, N_in, N_out)``, non-negative
       and summing to 1 over the parents, and the same poses and activations;
    3. the examples of a batch are routed independently;
    4. the children are a set: permuting them (votes and activations together) permutes the
       rows of ``R`` and changes neither the poses nor the activations;
    5. gradients flow from the poses and the activations back to the votes and the input
       activations, and are finite;
    6. malformed input (rank-3 votes, integer votes, activations of another shape) raises
       :class:`ValueError` or :class:`TypeError`.

    A routing with per-parent parameters must be built for ``out_capsules`` parents.

    Args:
        routing: the routing module to check.
        batch: batch size :math:`B` of the probe input.
        in_capsules: :math:`N_{in}` of the probe input.
        out_capsules: :math:`N_{out}` of the probe input.
        pose_dim: :math:`P` of the probe input.
        dtype: dtype of the probe input.
        device: device of the probe input.
        atol: absolute tolerance of the comparisons.
        seed: seed of the probe input.

    Examples:
        >>> from torchcaps import EMRouting
        >>> from torchcaps.testing import assert_matrix_routing_contract
        >>> assert_matrix_routing_contract(EMRouting(out_capsules=4))  # passes silently
    """
    name = type(routing).__name__
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, in_capsules, out_capsules, pose_dim)
    votes = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    acts = torch.rand(batch, in_capsules, generator=gen, dtype=torch.float64)
    acts = acts.to(device=device, dtype=dtype)
    votes.requires_grad_(True)
    acts.requires_grad_(True)

    out = routing(votes, acts)
    if not isinstance(out, tuple) or len(out) != 2:
        raise AssertionError(f"{name}: forward must return (poses, activations)")
    poses, a_out = out
    for what, t, want in (
        ("poses", poses, (batch, out_capsules, pose_dim)),
        ("activations", a_out, (batch, out_capsules)),
    ):
        if tuple(t.shape) != want:
            raise AssertionError(f"{name}: {what} must have shape {want}, got {tuple(t.shape)}")
        if t.dtype != votes.dtype:
            raise AssertionError(f"{name}: {what} must have the votes' dtype {votes.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise AssertionError(f"{name}: {what} have non-finite values for finite input")
    if bool(((a_out < -atol) | (a_out > 1 + atol)).any()):
        raise AssertionError(f"{name}: output activations must lie in [0, 1]")

    poses2, a_out2, r = routing(votes, acts, return_coupling=True)
    if not (
        torch.allclose(poses, poses2, atol=atol, rtol=0)
        and torch.allclose(a_out, a_out2, atol=atol, rtol=0)
    ):
        raise AssertionError(f"{name}: outputs differ between return_coupling=False and True")
    if tuple(r.shape) != (batch, in_capsules, out_capsules):
        raise AssertionError(
            f"{name}: R must have shape {(batch, in_capsules, out_capsules)}, got {tuple(r.shape)}"
        )
    if bool((r < -atol).any()):
        raise AssertionError(f"{name}: assignments R must be >= 0")
    ones = torch.ones(batch, in_capsules, dtype=r.dtype, device=r.device)
    if not torch.allclose(
        r.sum(dim=-1), ones, atol=max(atol, 1e-3 if dtype != torch.float64 else atol)
    ):
        raise AssertionError(f"{name}: assignments R must sum to 1 over the parents")

    for k in range(batch):
        p_k, a_k = routing(votes[k : k + 1], acts[k : k + 1])
        if not (
            torch.allclose(p_k[0], poses[k], atol=atol * 10, rtol=1e-4)
            and torch.allclose(a_k[0], a_out[k], atol=atol * 10, rtol=1e-4)
        ):
            raise AssertionError(
                f"{name}: example {k} routed alone differs from the batch: "
                "batch elements must be independent"
            )

    perm = torch.randperm(in_capsules, generator=gen).to(device)
    p_perm, a_perm, r_perm = routing(votes[:, perm], acts[:, perm], return_coupling=True)
    if not (
        torch.allclose(p_perm, poses, atol=atol * 10, rtol=1e-4)
        and torch.allclose(a_perm, a_out, atol=atol * 10, rtol=1e-4)
        and torch.allclose(r_perm, r[:, perm], atol=atol * 10, rtol=1e-4)
    ):
        raise AssertionError(
            f"{name}: permuting the children must permute R and leave the parents unchanged"
        )

    loss = poses.square().sum() + a_out.sum()
    grads = (
        torch.autograd.grad(loss, (votes, acts), allow_unused=True)
        if loss.requires_grad
        else (None, None)
    )
    for what, g in zip(("votes", "activations"), grads, strict=True):
        if g is None:
            raise AssertionError(f"{name}: no gradient flows back to the input {what}")
        if not bool(torch.isfinite(g).all()):
            raise AssertionError(f"{name}: the gradient w.r.t. the input {what} is not finite")

    plain = votes.detach()
    flat_acts = acts.detach()
    _raises_value_or_type_error(name, "rank-3 votes", lambda: routing(plain[..., 0], flat_acts))
    _raises_value_or_type_error(name, "integer votes", lambda: routing(plain.long(), flat_acts))
    _raises_value_or_type_error(
        name, "activations of another shape", lambda: routing(plain, flat_acts[:, :-1])
    )


def _fields(out: object, name: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    fields = getattr(out, "_fields", None)
    if fields != ("scores", "capsules", "reconstruction"):
        raise AssertionError(
            f"{name}: forward must return a CapsuleOutput(scores, capsules, reconstruction), "
            f"got {type(out).__name__}"
        )
    scores: Tensor = out.scores  # type: ignore[attr-defined]
    capsules: Tensor | None = out.capsules  # type: ignore[attr-defined]
    recon: Tensor | None = out.reconstruction  # type: ignore[attr-defined]
    return scores, capsules, recon


def assert_model_contract(
    model: nn.Module,
    *,
    batch: int = 2,
    check_compile: bool = True,
    check_export: bool = True,
    seed: int = 0,
) -> None:
    r"""Check that ``model`` follows the contract of :func:`torchcaps.models.register_model`.

    Raises :class:`AssertionError` naming the first broken rule. With ``x`` a random batch of
    ``model.in_shape`` and ``y`` random class indices:

    1. ``model`` has ``in_shape`` (a tuple) and ``num_classes`` (an int);
    2. ``model(x, y)`` and ``model(x)`` return a :class:`~torchcaps.models.CapsuleOutput`
       with ``scores`` :math:`(B, K)`, ``capsules`` :math:`(B, K, D)` or ``None`` (a model
       without capsules) and ``reconstruction`` :math:`(B, *\text{in\_shape})` or ``None``,
       all finite;
    3. without a target the reconstruction equals the one masked by the prediction
       ``scores.argmax(1)``;
    4. a loss on every output has finite gradients for every parameter that takes part, and
       at least one parameter gets a gradient;
    5. in eval mode ``torch.compile(model, fullgraph=True)`` (backend ``"aot_eager"``: graph
       capture without code generation) matches eager mode (``check_compile``);
    6. ``torch.export.export`` with a dynamic batch dimension gives a program that matches eager
       mode at another batch size (``check_export``).

    Args:
        model: the model to check (on the CPU, float32).
        batch: batch size of the probe input.
        check_compile: check rule 5.
        check_export: check rule 6.
        seed: seed of the probe input.

    Examples:
        >>> from torchcaps.models import get_model
        >>> from torchcaps.testing import assert_model_contract
        >>> assert_model_contract(get_model("capsnet_mnist"), check_compile=False)
    """
    name = type(model).__name__
    in_shape = getattr(model, "in_shape", None)
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(in_shape, tuple) or not isinstance(num_classes, int):
        raise AssertionError(f"{name}: a registered model needs in_shape (tuple) and num_classes")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *in_shape, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    model.train()
    scores, capsules, recon = _fields(model(x, y), name)
    if tuple(scores.shape) != (batch, num_classes):
        raise AssertionError(f"{name}: scores must be (B, K) = {(batch, num_classes)}")
    if capsules is not None and (
        capsules.dim() != 3 or tuple(capsules.shape[:2]) != (batch, num_classes)
    ):
        raise AssertionError(f"{name}: capsules must be (B, K, D), got {tuple(capsules.shape)}")
    if recon is not None and tuple(recon.shape) != (batch, *in_shape):
        raise AssertionError(
            f"{name}: reconstruction must be (B, *in_shape) = {(batch, *in_shape)}"
        )
    outputs = [t for t in (scores, capsules, recon) if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in outputs):
        raise AssertionError(f"{name}: outputs are not finite for finite input")
    loss = sum(t.float().square().mean() for t in outputs)
    model.zero_grad(set_to_none=True)
    if loss.requires_grad:  # type: ignore[union-attr]  # outputs outside the graph: no backward
        loss.backward()  # type: ignore[union-attr]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        raise AssertionError(f"{name}: no parameter receives a gradient")
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise AssertionError(f"{name}: gradients are not finite")
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        ref = _fields(model(x), name)
        if ref[2] is not None:
            masked = _fields(model(x, ref[0].argmax(dim=1)), name)[2]
            if masked is None or not torch.allclose(ref[2], masked, atol=1e-6):
                raise AssertionError(
                    f"{name}: without a target the decoder must be masked by the prediction"
                )
        if check_compile:
            torch.compiler.reset()
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            got = _fields(compiled(x), name)
            _assert_close(name, "torch.compile", ref, got)
        if check_export:
            x2 = torch.rand(batch + 1, *in_shape, generator=gen)
            ref2 = _fields(model(x2), name)
            dim = torch.export.Dim("batch", min=1, max=1024)
            program = torch.export.export(model, (x,), dynamic_shapes=({0: dim},))
            got2 = _fields(program.module()(x2), name)
            _assert_close(name, "torch.export", ref2, got2)


def _assert_close(name: str, what: str, ref: tuple, got: tuple) -> None:
    for field, r, g in zip(("scores", "capsules", "reconstruction"), ref, got):
        if (r is None) != (g is None) or (
            r is not None and not torch.allclose(r, g, atol=1e-5, rtol=1e-4)
        ):
            raise AssertionError(f"{name}: {field} of the {what} model differs from eager mode")
