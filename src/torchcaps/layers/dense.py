"""Fully connected capsules: :class:`DenseCaps`, every child predicts every parent, then routing."""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from torchcaps._checks import (
    autocast_dtype_out,
    check_int,
    check_tensor,
    in_graph_capture,
    is_compiling_to_run,
    shape_str,
)
from torchcaps.errors import ShapeError
from torchcaps.layers._common import layer_routing, predictions, route_in_chunks
from torchcaps.layers._dense_routing_op import dense_dynamic_routing
from torchcaps.routing import DynamicRouting, Routing, resolve_routing

__all__ = ["DenseCaps"]

# batch_chunk="auto" on CPU: float32 predictions per chunk at most this many bytes when autograd
# records the chunk (each chunk then adds a pass over the weight gradient), and at most the
# smaller budget when it does not (evaluation); the rule and its measurements:
# docs/performance.md.
_AUTO_CHUNK_BYTES = 16 * 1024 * 1024
_AUTO_NO_GRAD_CHUNK_BYTES = 8 * 1024 * 1024


class DenseCaps(nn.Module):
    r"""Fully connected capsule layer with a pluggable routing algorithm: the paper's DigitCaps.

    Each pair of input capsule :math:`i` and output capsule :math:`j` has its own weight matrix
    :math:`W_{ij}` of shape ``(out_dim, in_dim)``, giving the prediction vectors

    .. math::
        \hat{u}_{j|i} = W_{ij} u_i,

    from which ``routing`` computes the outputs :math:`v_j` (by default
    :class:`~torchcaps.DynamicRouting` with 3 iterations). All predictions are computed in one
    batched matrix multiplication, in float32 under autocast. The paper's DigitCaps is
    ``DenseCaps(1152, 8, 10, 16)``. The layer has no bias, as in the paper.

    Args:
        in_capsules: number of input capsules :math:`N_{in}`.
        in_dim: dimension of each input capsule.
        out_capsules: number of output capsules :math:`N_{out}`.
        out_dim: dimension of each output capsule.
        routing: a :class:`~torchcaps.routing.Routing` instance or a name (``"dynamic"``).
        routing_kwargs: constructor arguments when ``routing`` is a name.
        batch_chunk: route the batch in chunks of this many examples (each chunk's predictions
            and routing, then the next), so that a chunk's predictions stay in the CPU's cache
            through all routing rounds; the result is the same (routing treats examples
            independently, see :class:`~torchcaps.routing.Routing`). ``None``: the whole batch
            at once. ``"auto"`` (default): on CPU in eager mode, chunks whose float32
            predictions take at most 16 MiB where autograd records the forward (22 examples
            for the paper's DigitCaps) and at most 8 MiB where it does not (11 examples:
            evaluation under ``torch.no_grad()``), the whole batch elsewhere; under
            :func:`torch.compile` on CPU a :class:`~torchcaps.DynamicRouting` layer keeps
            these chunks inside the operator ``torchcaps::dense_dynamic_routing``. The rule
            and its measurements are on the :doc:`Performance </performance>` page.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: :math:`(B, *, D_{in})` where the middle dimensions multiply to
          :math:`N_{in}`, e.g. :math:`(B, N_{in}, D_{in})` or a
          :class:`Conv2dCaps` grid :math:`(B, N, H, W, D_{in})`.
        - Output: :math:`(B, N_{out}, D_{out})`; with ``return_coupling=True`` also the
          coupling coefficients :math:`(B, N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps import DenseCaps, DynamicRouting
        >>> digits = DenseCaps(1152, 8, 10, 16, routing=DynamicRouting(iterations=3))
        >>> v = digits(torch.randn(2, 32, 6, 6, 8))
        >>> v.shape
        torch.Size([2, 10, 16])
        >>> v, c = digits(torch.randn(2, 1152, 8), return_coupling=True)
        >>> c.shape
        torch.Size([2, 1152, 10])
    """

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        routing: str | Routing = "dynamic",
        routing_kwargs: dict[str, Any] | None = None,
        *,
        batch_chunk: int | Literal["auto"] | None = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "DenseCaps"
        if isinstance(batch_chunk, str) and batch_chunk != "auto":
            raise ValueError(
                f"{owner}: batch_chunk must be a positive int, 'auto' or None, got {batch_chunk!r}"
            )
        if batch_chunk is not None and batch_chunk != "auto":
            batch_chunk = check_int("batch_chunk", batch_chunk, owner=owner)
        self.batch_chunk: int | Literal["auto"] | None = batch_chunk
        self.in_capsules = check_int("in_capsules", in_capsules, owner=owner)
        self.in_dim = check_int("in_dim", in_dim, owner=owner)
        self.out_capsules = check_int("out_capsules", out_capsules, owner=owner)
        self.out_dim = check_int("out_dim", out_dim, owner=owner)
        self.routing = layer_routing(routing, routing_kwargs, resolve_routing, owner=owner)
        # Stored as (N_in, D_in, N_out * D_out): one batched matmul over the input capsules.
        self.weight = nn.Parameter(
            torch.empty(in_capsules, in_dim, out_capsules * out_dim, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Draw the weights from :math:`\mathcal{N}(0, 0.01^2)`."""
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    @property
    def weight_matrices(self) -> Tensor:
        r"""The weights as :math:`W_{ij}` matrices of shape ``(N_in, N_out, D_out, D_in)``."""
        return self.weight.unflatten(2, (self.out_capsules, self.out_dim)).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return (
            f"in_capsules={self.in_capsules}, in_dim={self.in_dim}, "
            f"out_capsules={self.out_capsules}, out_dim={self.out_dim}"
            + (f", batch_chunk={self.batch_chunk!r}" if self.batch_chunk != "auto" else "")
        )

    def predictions(self, x: Tensor) -> Tensor:
        r"""Prediction vectors :math:`\hat{u}_{j|i}` of shape ``(B, N_in, N_out, D_out)``.

        The returned tensor is a transposed view of a ``(B, N_out, N_in, D_out)``-contiguous
        buffer, the layout the routing reductions read fastest.
        """
        return self._predict(self._flatten_input(x))

    def _predict(self, u: Tensor) -> Tensor:
        """:meth:`predictions` of an already checked ``(B, N_in, D_in)`` input."""
        return predictions(u, self.weight, self.out_capsules, self.out_dim)

    def _flatten_input(self, x: Tensor) -> Tensor:
        owner = "DenseCaps"
        check_tensor("input", x, owner=owner)
        if (
            x.dim() < 3
            or x.shape[-1] != self.in_dim
            or math.prod(x.shape[1:-1]) != self.in_capsules
        ):
            raise ShapeError(
                f"{owner} expected {self.in_capsules} input capsules of dim {self.in_dim}, i.e. "
                f"input of shape (B, {self.in_capsules}, {self.in_dim}) or (B, ..., {self.in_dim}) "
                f"with middle dims multiplying to {self.in_capsules}, got input of shape "
                f"{shape_str(x.shape)}"
            )
        return x.reshape(x.shape[0], self.in_capsules, self.in_dim)

    @overload
    def forward(self, x: Tensor, return_coupling: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, return_coupling: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(self, x: Tensor, return_coupling: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Compute the predictions and route them to the output capsules."""
        check_tensor("input", x, owner="DenseCaps")
        out_dtype = autocast_dtype_out(x)
        u = self._flatten_input(x)
        if not return_coupling and self._routes_as_operator(u):
            routing = self.routing
            assert isinstance(routing, DynamicRouting)
            options = (routing.iterations, routing.eps, routing.stop_gradient)
            chunk = self._chunk_size(u, capture=False)
            dims = (self.out_capsules, self.out_dim)
            v = dense_dynamic_routing(u, self.weight, routing.log_prior, *dims, options, chunk)
            return v.to(out_dtype)
        v, c = route_in_chunks(self, u, self._chunk_size(u), return_coupling)
        if c is not None:
            return v.to(out_dtype), c
        return v.to(out_dtype)

    def _routes_as_operator(self, u: Tensor) -> bool:
        """Whether to predict and route as ``torchcaps::dense_dynamic_routing`` (compiled, CPU).

        For the paper's routing only (exactly :class:`~torchcaps.DynamicRouting`, whose rounds
        the operator runs), a float32 weight and prior, and a floating-point input of at most
        float32 (the eager rules: ``layers/_dense_routing_op.py``).
        """
        prior = getattr(self.routing, "log_prior", None)
        return (
            is_compiling_to_run()
            and type(self.routing) is DynamicRouting
            and u.device.type == "cpu"
            and u.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and self.weight.dtype == torch.float32
            and (
                prior is None
                or (
                    prior.dtype == torch.float32
                    and prior.shape == (self.in_capsules, self.out_capsules)
                )
            )
        )

    def _chunk_size(self, u: Tensor, capture: bool | None = None) -> int:
        """Examples per routing chunk for input ``u`` (B, N_in, D_in); B means no chunking.

        ``capture``: whether a graph capture is running (``"auto"`` does not chunk then); by
        default :func:`in_graph_capture`. The compile operator asks for the eager rule.
        """
        batch = u.shape[0]
        if self.batch_chunk is None:
            return max(batch, 1)
        if self.batch_chunk != "auto":
            return self.batch_chunk
        if capture is None:
            capture = in_graph_capture()
        if u.device.type != "cpu" or capture:
            return max(batch, 1)
        per_example = self.in_capsules * self.out_capsules * self.out_dim * 4
        records = torch.is_grad_enabled() and (
            u.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        chunk = (_AUTO_CHUNK_BYTES if records else _AUTO_NO_GRAD_CHUNK_BYTES) // per_example
        # Each chunk adds a pass over the weight gradient, in_dim times the size of one
        # example's predictions: chunks of fewer than in_dim examples cost more than they save.
        return chunk if chunk >= self.in_dim else max(batch, 1)
