"""Routed convolutional capsules: :class:`ConvCaps2d`, from one capsule grid to the next."""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from torchcaps._checks import (
    IntPair,
    autocast_dtype_out,
    check_int,
    check_pair,
    check_shape,
    check_tensor,
    in_graph_capture,
    shape_str,
)
from torchcaps.errors import ShapeError
from torchcaps.layers._common import (
    capsule_windows,
    layer_routing,
    output_size,
    predictions,
    route_in_chunks,
)
from torchcaps.routing import Routing, resolve_routing

__all__ = ["ConvCaps2d"]

# Float32 predictions routed at once at most (rows = examples x output positions): a 32x32
# grid of a wide layer is routed in several chunks instead of one tensor of all positions.
CHUNK_BYTES = 64 * 1024 * 1024


class ConvCaps2d(nn.Module):
    r"""Convolutional capsules with routing: a capsule grid to a capsule grid (ConvCaps).

    The children of the output position :math:`(h, w)` are the :math:`k_H k_W N_{in}` input
    capsules of its window (padding adds zero capsules), ordered (kernel row, kernel column,
    capsule type). Each (kernel position, input type :math:`n`, output type :math:`j`) has its
    own :math:`D_{out} \times D_{in}` matrix, shared over positions:

    .. math::
        \hat{u}_{(k_y, k_x, n) \to j}(h, w) = W_{k_y, k_x, n, j}\,
        u_n(h s_H + k_y - p_H,\; w s_W + k_x - p_W),

    and ``routing`` turns the predictions of each output position into its :math:`N_{out}`
    capsules, independently at every position (the positions are folded into the batch of the
    :class:`~torchcaps.routing.Routing` contract, so every routing plugs in, your own too). The
    output grid has the size of :class:`torch.nn.Conv2d`'s. Unlike :class:`Conv2dCaps` (primary
    capsules: a convolution whose channels are grouped into capsules, no routing), this layer
    routes. In eager mode predictions are routed in chunks of at most 64 MiB (float32), so
    without autograd (evaluation) large grids never hold every position's predictions at once;
    the result is the same. With autograd each chunk's predictions are kept for the backward,
    as the routing's saved tensors, so training memory still grows with the grid. Under
    :func:`torch.compile` and :func:`torch.export.export` the layer routes in one piece, so
    that the graph does not depend on the batch size.

    Args:
        in_capsules: capsule types :math:`N_{in}` per input position.
        in_dim: dimension :math:`D_{in}` of an input capsule.
        out_capsules: capsule types :math:`N_{out}` per output position.
        out_dim: dimension :math:`D_{out}` of an output capsule.
        kernel_size: window size :math:`(k_H, k_W)`.
        stride: stride :math:`(s_H, s_W)`.
        padding: zero capsules added on each side :math:`(p_H, p_W)`.
        routing: a :class:`~torchcaps.routing.Routing` instance or a name (``"dynamic"``).
        routing_kwargs: constructor arguments when ``routing`` is a name.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - inp: :math:`(B, N_{in}, H, W, D_{in})`.
        - Output: :math:`(B, N_{out}, H', W', D_{out})`; with ``return_coupling=True`` also the
          coupling coefficients :math:`(B, H', W', k_H k_W N_{in}, N_{out})`.

    Examples:
        >>> import torch
        >>> from torchcaps import ConvCaps2d
        >>> layer = ConvCaps2d(8, 16, 4, 16, kernel_size=3, stride=2, padding=1)
        >>> layer(torch.randn(2, 8, 10, 10, 16)).shape
        torch.Size([2, 4, 5, 5, 16])
        >>> v, c = layer(torch.randn(2, 8, 10, 10, 16), return_coupling=True)
        >>> c.shape  # 3 * 3 * 8 children per output position
        torch.Size([2, 5, 5, 72, 4])
    """

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        routing: str | Routing = "dynamic",
        routing_kwargs: dict[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "ConvCaps2d"
        self.in_capsules = check_int("in_capsules", in_capsules, owner=owner)
        self.in_dim = check_int("in_dim", in_dim, owner=owner)
        self.out_capsules = check_int("out_capsules", out_capsules, owner=owner)
        self.out_dim = check_int("out_dim", out_dim, owner=owner)
        self.kernel_size = check_pair("kernel_size", kernel_size, minimum=1, owner=owner)
        self.stride = check_pair("stride", stride, minimum=1, owner=owner)
        self.padding = check_pair("padding", padding, minimum=0, owner=owner)
        self.routing = layer_routing(routing, routing_kwargs, resolve_routing, owner=owner)
        kh, kw = self.kernel_size
        # Stored as (kH*kW*N_in, D_in, N_out*D_out): one batched matmul over the children.
        self.weight = nn.Parameter(
            torch.empty(
                kh * kw * in_capsules, in_dim, out_capsules * out_dim, device=device, dtype=dtype
            )
        )
        self.reset_parameters()

    @property
    def window_capsules(self) -> int:
        """Children per output position, :math:`k_H k_W N_{in}`."""
        return self.kernel_size[0] * self.kernel_size[1] * self.in_capsules

    def reset_parameters(self) -> None:
        r"""Draw the weights from :math:`\mathcal{N}(0, 0.01^2)`, as :class:`DenseCaps` does."""
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    @property
    def weight_matrices(self) -> Tensor:
        r"""The weights as matrices of shape ``(kH, kW, N_in, N_out, D_out, D_in)``.

        A view of the parameter: writing into it (under ``torch.no_grad()``) sets the weights.
        """
        kh, kw = self.kernel_size
        w = self.weight.view(kh, kw, self.in_capsules, self.in_dim, self.out_capsules, self.out_dim)
        return w.permute(0, 1, 2, 4, 5, 3)

    def extra_repr(self) -> str:
        return (
            f"in_capsules={self.in_capsules}, in_dim={self.in_dim}, "
            f"out_capsules={self.out_capsules}, out_dim={self.out_dim}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size :math:`(H', W')` of the output grid for an input of ``height x width``."""
        return output_size(height, width, self.kernel_size, self.stride, self.padding)

    def _predict(self, u: Tensor) -> Tensor:
        """Predictions ``(rows, K, N_out, D_out)`` of children ``u`` ``(rows, K, D_in)``."""
        return predictions(u, self.weight, self.out_capsules, self.out_dim)

    @overload
    def forward(self, inp: Tensor, return_coupling: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, inp: Tensor, return_coupling: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(self, inp: Tensor, return_coupling: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gather each output position's window, predict, route."""
        owner = "ConvCaps2d"
        check_tensor("inp", inp, owner=owner)
        check_shape(
            inp,
            "B N H W D",
            name="inp",
            owner=owner,
            empty_ok=("B", "H", "W"),
            N=self.in_capsules,
            D=self.in_dim,
        )
        h_out, w_out = self.output_size(inp.shape[2], inp.shape[3])
        if h_out < 1 or w_out < 1:
            raise ShapeError(
                f"{owner}: input grid {inp.shape[2]}x{inp.shape[3]} is smaller than the kernel "
                f"{self.kernel_size} (padding {self.padding}); got inp {shape_str(inp.shape)}"
            )
        out_dtype = autocast_dtype_out(inp)
        b = inp.shape[0]
        u, _, _ = capsule_windows(inp, self.kernel_size, self.stride, self.padding)
        per_row = self.window_capsules * self.out_capsules * self.out_dim * 4
        # Under torch.compile/export one piece: a chunk count that depends on the batch would
        # specialise the graph to a range of batch sizes.
        rows = u.shape[0] if in_graph_capture() else max(1, CHUNK_BYTES // per_row)
        v, c = route_in_chunks(self, u, rows, return_coupling)
        v = v.view(b, h_out, w_out, self.out_capsules, self.out_dim).permute(0, 3, 1, 2, 4)
        v = v.to(out_dtype)
        if c is None:
            return v
        return v, c.view(b, h_out, w_out, self.window_capsules, self.out_capsules)
