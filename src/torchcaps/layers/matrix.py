"""Matrix-capsule layers (Hinton, Sabour & Frosst 2018): primary, convolutional and class capsules.

A matrix capsule is a 4x4 pose matrix, flattened to 16 values, and an activation in (0, 1). The
layers pass both together as a :class:`MatrixCapsules` pair, so they compose in
:class:`torch.nn.Sequential`. Child :math:`i` votes :math:`V_{ij} = M_i W_{ij}` for parent
:math:`j` (a 4x4 matrix product), and a :class:`~torchcaps.routing.MatrixRouting` (by default
:class:`~torchcaps.routing.EMRouting`) turns votes and activations into the parents.
"""

# No ``from __future__ import annotations``: the NamedTuple's field types stay real classes, which
# the API docs resolve.
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from torchcaps._checks import (
    IntPair,
    check_choice,
    check_float,
    check_int,
    check_pair,
    check_shape,
    check_tensor,
    in_graph_capture,
    shape_str,
)
from torchcaps.errors import ShapeError
from torchcaps.layers._common import capsule_windows, layer_routing, output_size
from torchcaps.layers.conv import CHUNK_BYTES
from torchcaps.routing import EMRouting, MatrixRouting, resolve_matrix_routing

__all__ = ["ClassMatrixCaps", "ConvMatrixCaps2d", "MatrixCapsules", "PrimaryMatrixCaps"]

POSE = 4  # poses are POSE x POSE matrices
POSE_DIM = POSE * POSE


class MatrixCapsules(NamedTuple):
    """Poses and activations of a layer of matrix capsules.

    On a grid: ``poses`` (B, N, H, W, 16) and ``activations`` (B, N, H, W); flat (class
    capsules): ``poses`` (B, N, 16) and ``activations`` (B, N).
    """

    poses: Tensor
    activations: Tensor


def _check_grid(x: Any, n: int, owner: str) -> MatrixCapsules:
    """``x`` must be a MatrixCapsules grid of ``n`` capsule types."""
    if not (isinstance(x, tuple) and len(x) == 2):
        raise TypeError(
            f"{owner}: input must be a MatrixCapsules(poses, activations) pair, "
            f"got {type(x).__name__}"
        )
    poses, acts = x
    check_tensor("poses", poses, owner=owner)
    check_tensor("activations", acts, owner=owner)
    sizes = check_shape(poses, "B N H W 16", name="poses", owner=owner, N=n)
    check_shape(
        acts,
        "B N H W",
        name="activations",
        owner=owner,
        note=" (the poses' batch, types and grid)",
        B=sizes["B"],
        N=n,
        H=sizes["H"],
        W=sizes["W"],
    )
    return MatrixCapsules(poses, acts)


ReceptiveField = tuple[tuple[float, float], tuple[float, float]]


def _check_receptive_field(value: Any, owner: str) -> ReceptiveField | None:
    """``None`` or ``((y0, dy), (x0, dx))`` of finite numbers, as floats."""
    if value is None:
        return None
    pairs = value if isinstance(value, (tuple, list)) and len(value) == 2 else ()
    if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise TypeError(
            f"{owner}: receptive_field must be None or ((y0, dy), (x0, dx)), got {value!r}"
        )
    (y0, dy), (x0, dx) = (
        tuple(check_float("receptive_field", v, owner=owner) for v in pair) for pair in pairs
    )
    return (y0, dy), (x0, dx)


def _routing(routing: Any, routing_kwargs: Any, out_capsules: int, owner: str) -> MatrixRouting:
    """Resolve ``routing``; a named routing is built for ``out_capsules`` parents."""
    if isinstance(routing, str) and (routing_kwargs is None or isinstance(routing_kwargs, dict)):
        routing_kwargs = {"out_capsules": out_capsules, **(routing_kwargs or {})}
    r = layer_routing(routing, routing_kwargs, resolve_matrix_routing, owner=owner)
    n_out = getattr(r, "out_capsules", out_capsules)
    if n_out != out_capsules:
        raise ValueError(
            f"{owner}: routing {r!r} is built for {n_out} parents, the layer has {out_capsules}"
        )
    return r


def _vote_matrices(poses: Tensor, weight: Tensor) -> Tensor:
    """Votes ``M_k @ W_kj``: poses (R, K, 16), weight (K, N_out, 4, 4) -> (R, K, N_out, 4, 4).

    One batched matmul over the K children kinds, (K, R*4, 4) @ (K, 4, N_out*4); the result is
    a strided view of its output (EM reads it as it is, without a copy).
    """
    r, k = poses.shape[0], poses.shape[1]
    n_out = weight.shape[1]
    m = poses.view(r, k, POSE, POSE).permute(1, 0, 2, 3).reshape(k, r * POSE, POSE)
    w = weight.to(m.dtype).permute(0, 2, 1, 3).reshape(k, POSE, n_out * POSE)
    v = torch.bmm(m, w).view(k, r, POSE, n_out, POSE)
    return v.permute(1, 0, 3, 2, 4)


def _votes(poses: Tensor, weight: Tensor) -> Tensor:
    """:func:`_vote_matrices` flattened: (R, K, N_out, 16)."""
    v = _vote_matrices(poses, weight)
    return v.reshape(*v.shape[:3], POSE_DIM)


class PrimaryMatrixCaps(nn.Module):
    r"""Primary matrix capsules: a 1x1 convolution to poses and one to sigmoid activations.

    At every position of a feature map, ``out_capsules`` capsule types, each a 4x4 pose
    (16 channels of a 1x1 convolution) and an activation (one channel of another 1x1
    convolution, then a sigmoid), as the paper's PrimaryCaps layer.

    Args:
        in_channels: channels :math:`C` of the feature map.
        out_capsules: capsule types :math:`N` per position.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: :math:`(B, C, H, W)`.
        - Output: :class:`MatrixCapsules` with poses :math:`(B, N, H, W, 16)` and
          activations :math:`(B, N, H, W)`.

    Examples:
        >>> import torch
        >>> from torchcaps.layers import PrimaryMatrixCaps
        >>> caps = PrimaryMatrixCaps(32, 8)(torch.randn(2, 32, 14, 14))
        >>> caps.poses.shape, caps.activations.shape
        (torch.Size([2, 8, 14, 14, 16]), torch.Size([2, 8, 14, 14]))
    """

    def __init__(
        self,
        in_channels: int,
        out_capsules: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "PrimaryMatrixCaps"
        self.in_channels = check_int("in_channels", in_channels, owner=owner)
        self.out_capsules = check_int("out_capsules", out_capsules, owner=owner)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.pose = nn.Conv2d(in_channels, out_capsules * POSE_DIM, 1, **kw)
        self.activation = nn.Conv2d(in_channels, out_capsules, 1, **kw)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_capsules={self.out_capsules}"

    def forward(self, x: Tensor) -> MatrixCapsules:
        """Poses and activations at every position of ``x``."""
        owner = "PrimaryMatrixCaps"
        check_tensor("x", x, owner=owner)
        check_shape(x, "B C H W", name="x", owner=owner, C=self.in_channels)
        b, _, h, w = x.shape
        poses = self.pose(x).view(b, self.out_capsules, POSE_DIM, h, w).permute(0, 1, 3, 4, 2)
        return MatrixCapsules(poses, torch.sigmoid(self.activation(x)))


class ConvMatrixCaps2d(nn.Module):
    r"""Convolutional matrix capsules with EM routing between capsule grids (ConvCaps).

    The children of the output position :math:`(h, w)` are the :math:`k_H k_W N_{in}` capsules
    of its window (padding adds zero capsules, inactive), ordered (kernel row, kernel column,
    capsule type). Each (kernel position, input type, output type) has its own 4x4 matrix,
    shared over positions: :math:`V_{(k_y, k_x, n) \to j} = M_n(h s_H + k_y - p_H, w s_W + k_x
    - p_W)\, W_{k_y, k_x, n, j}`. ``routing`` runs EM over the votes of every output position.

    ``assignment`` says over which parents each child's assignments :math:`R` are normalised
    in the E-step:

    - ``"all_positions"`` (default, the official code's): over every parent at every output
      position whose window contains the child, so that overlapping windows compete for it
      and each child's assignments sum to 1 in total;
    - ``"per_window"``: over the parents of each window separately (each window routes as an
      independent problem; a child seen by several windows is counted once in each).

    The two are the same when windows do not overlap (stride >= kernel). Without autograd
    (evaluation), whole images are routed in chunks of at most 64 MiB of votes.

    Args:
        in_capsules: capsule types :math:`N_{in}` per input position.
        out_capsules: capsule types :math:`N_{out}` per output position.
        kernel_size: window size :math:`(k_H, k_W)`.
        stride: stride :math:`(s_H, s_W)`.
        padding: zero capsules added on each side :math:`(p_H, p_W)`.
        routing: a :class:`~torchcaps.routing.MatrixRouting` instance or a name (``"em"``;
            built for ``out_capsules`` parents).
        routing_kwargs: constructor arguments when ``routing`` is a name.
        assignment: ``"all_positions"`` or ``"per_window"`` (see above); ``"all_positions"``
            needs a routing with a ``log_normalize`` hook, as :class:`~torchcaps.EMRouting`.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: :class:`MatrixCapsules` with poses :math:`(B, N_{in}, H, W, 16)` and
          activations :math:`(B, N_{in}, H, W)`.
        - Output: :class:`MatrixCapsules` with poses :math:`(B, N_{out}, H', W', 16)` and
          activations :math:`(B, N_{out}, H', W')`, :math:`H', W'` as for
          :class:`torch.nn.Conv2d`.

    Examples:
        >>> import torch
        >>> from torchcaps.layers import ConvMatrixCaps2d, MatrixCapsules
        >>> layer = ConvMatrixCaps2d(8, 16, kernel_size=3, stride=2)
        >>> x = MatrixCapsules(torch.randn(2, 8, 12, 12, 16), torch.rand(2, 8, 12, 12))
        >>> y = layer(x)
        >>> y.poses.shape, y.activations.shape
        (torch.Size([2, 16, 5, 5, 16]), torch.Size([2, 16, 5, 5]))
    """

    def __init__(
        self,
        in_capsules: int,
        out_capsules: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        routing: str | MatrixRouting = "em",
        routing_kwargs: dict[str, Any] | None = None,
        assignment: Literal["all_positions", "per_window"] = "all_positions",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "ConvMatrixCaps2d"
        self.in_capsules = check_int("in_capsules", in_capsules, owner=owner)
        self.out_capsules = check_int("out_capsules", out_capsules, owner=owner)
        self.kernel_size = check_pair("kernel_size", kernel_size, minimum=1, owner=owner)
        self.stride = check_pair("stride", stride, minimum=1, owner=owner)
        self.padding = check_pair("padding", padding, minimum=0, owner=owner)
        self.assignment = check_choice(
            "assignment", assignment, ("all_positions", "per_window"), owner=owner
        )
        self.routing = _routing(routing, routing_kwargs, out_capsules, owner)
        if self.assignment == "all_positions" and not isinstance(self.routing, EMRouting):
            raise TypeError(
                f"{owner}: assignment='all_positions' needs a routing with a log_normalize hook "
                f"(EMRouting), got {type(self.routing).__name__}; use assignment='per_window'"
            )
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(
            torch.empty(kh * kw * in_capsules, out_capsules, POSE, POSE, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Draw the matrices from :math:`\mathcal{N}(0, 0.3^2)`; reset the routing.

        0.3 is the official code's standard deviation for convolutional capsules.
        """
        nn.init.normal_(self.weight, mean=0.0, std=0.3)
        reset = getattr(self.routing, "reset_parameters", None)
        if callable(reset):
            reset()

    @property
    def weight_matrices(self) -> Tensor:
        """The 4x4 matrices as a view of shape ``(kH, kW, N_in, N_out, 4, 4)``."""
        kh, kw = self.kernel_size
        return self.weight.view(kh, kw, self.in_capsules, self.out_capsules, POSE, POSE)

    def extra_repr(self) -> str:
        return (
            f"in_capsules={self.in_capsules}, out_capsules={self.out_capsules}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"assignment={self.assignment!r}"
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size :math:`(H', W')` of the output grid for an input of ``height x width``."""
        return output_size(height, width, self.kernel_size, self.stride, self.padding)

    def forward(self, x: MatrixCapsules) -> MatrixCapsules:
        """Gather each output position's window, vote, route."""
        owner = "ConvMatrixCaps2d"
        poses, acts = _check_grid(x, self.in_capsules, owner)
        b, _, h, w, _ = poses.shape
        h_out, w_out = self.output_size(h, w)
        if h_out < 1 or w_out < 1:
            raise ShapeError(
                f"{owner}: input grid {h}x{w} is smaller than the kernel {self.kernel_size} "
                f"(padding {self.padding}); got poses {shape_str(poses.shape)}"
            )
        kh, kw = self.kernel_size
        per_image = 3 * 4 * h_out * w_out * kh * kw * self.in_capsules * self.out_capsules * 16
        if torch.is_grad_enabled() or in_graph_capture() or b * per_image <= CHUNK_BYTES:
            return self._route(poses, acts, h_out, w_out)
        # Without a graph, whole images in chunks of at most CHUNK_BYTES of votes (and EM's
        # stacked votes, twice their size), instead of the whole batch's at once.
        step = max(1, CHUNK_BYTES // per_image)
        parts = [
            self._route(poses[i : i + step], acts[i : i + step], h_out, w_out)
            for i in range(0, b, step)
        ]
        return MatrixCapsules(
            torch.cat([part.poses for part in parts]),
            torch.cat([part.activations for part in parts]),
        )

    def _route(self, poses: Tensor, acts: Tensor, h_out: int, w_out: int) -> MatrixCapsules:
        """Windows, votes and routing of validated input (any number of whole images)."""
        b, _, h, w, _ = poses.shape
        win_poses, _, _ = capsule_windows(poses, self.kernel_size, self.stride, self.padding)
        win_acts, _, _ = capsule_windows(
            acts.unsqueeze(-1), self.kernel_size, self.stride, self.padding
        )
        child_acts = win_acts[..., 0]
        if isinstance(self.routing, EMRouting):
            # the votes as 4x4 matrices in the layout of their product (EM takes any strides);
            # with "all_positions" the E-step normalises over all windows
            normalize = None
            if self.assignment == "all_positions":
                normalize = self._all_positions_normalizer(b, h, w, h_out, w_out)
            votes = _vote_matrices(win_poses, self.weight)
            out_poses, out_acts, _ = self.routing.route(votes, child_acts, normalize)
        else:  # any other MatrixRouting, per window, through its validated forward
            out_poses, out_acts = self.routing(_votes(win_poses, self.weight), child_acts)
        n = self.out_capsules
        out_poses = out_poses.view(b, h_out, w_out, n, POSE_DIM).permute(0, 3, 1, 2, 4)
        out_acts = out_acts.view(b, h_out, w_out, n).permute(0, 3, 1, 2)
        return MatrixCapsules(out_poses, out_acts)

    def _all_positions_normalizer(self, b: int, h: int, w: int, h_out: int, w_out: int) -> Any:
        """A ``log_normalize`` for EM: log-softmax over every (position, parent) that sees a child.

        The log posteriors ``(B * H' * W', kH * kW * N_in, N_out)`` are reduced over the parents
        (logsumexp), then over all windows containing the same child (a scatter over the padded
        grid), and that total is subtracted, so each child's assignments sum to 1.
        """
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        wp = w + 2 * pw
        n_in = self.in_capsules
        dev = self.weight.device
        rows = (torch.arange(h_out, device=dev) * sh).view(h_out, 1, 1, 1)
        cols = (torch.arange(w_out, device=dev) * sw).view(1, w_out, 1, 1)
        ky = torch.arange(kh, device=dev).view(1, 1, kh, 1)
        kx = torch.arange(kw, device=dev).view(1, 1, 1, kw)
        child = ((rows + ky) * wp + cols + kx).reshape(1, -1, 1)  # (1, H'W'kHkW, 1)
        cells = (h + 2 * ph) * wp

        def log_normalize(logits: Tensor) -> Tensor:
            shape = logits.shape
            per_window = torch.logsumexp(logits, dim=2)  # over the parents
            flat = per_window.view(b, -1, n_in)  # (B, H'W'kHkW, N_in)
            index = child.expand(b, -1, n_in)
            top = flat.new_full((b, cells, n_in), float("-inf"))
            top = top.scatter_reduce(1, index, flat.detach(), reduce="amax")
            top_k = top.gather(1, index)
            total = flat.new_zeros((b, cells, n_in)).scatter_add(1, index, torch.exp(flat - top_k))
            lse = torch.log(total.gather(1, index)) + top_k  # over all windows of the child
            return logits - lse.view(shape[0], shape[1], 1)

        return log_normalize


class ClassMatrixCaps(nn.Module):
    r"""Class capsules from a grid of matrix capsules, with coordinate addition.

    Every child (input type :math:`n` at grid position :math:`(h, w)`) votes for every class
    :math:`j` with a 4x4 matrix shared over positions, :math:`V = M\, W_{n, j}`. With
    ``coordinate_addition`` (the paper's), the scaled coordinates :math:`(y_h, x_w)` of the
    centre of the child's receptive field are added to the first two entries of the vote's
    last column (the translation part of a 4x4 pose; entries 3 and 7 of the flattened vote),
    so that the votes keep where their children are. ``routing`` runs once over all
    :math:`H W N_{in}` children.

    The layer cannot see the network below it, so ``receptive_field`` tells it where the
    centres are: ``((y0, dy), (x0, dx))`` gives :math:`y_h = y_0 + h\, dy` and
    :math:`x_w = x_0 + w\, dx`, in units of the input image's height and width (0 and
    1 its edges). :class:`~torchcaps.models.MatrixCapsNet` passes its own, the paper's
    coordinates. ``None`` (the default) takes the centres of the grid's cells,
    :math:`((h + 0.5) / H, (w + 0.5) / W)`, as IBM's reproduction does: the receptive fields
    of a grid that tiles the image.

    Args:
        in_capsules: capsule types :math:`N_{in}` per grid position.
        out_capsules: classes :math:`K`.
        routing: a :class:`~torchcaps.routing.MatrixRouting` instance or a name (``"em"``).
        routing_kwargs: constructor arguments when ``routing`` is a name.
        coordinate_addition: whether to add the children's coordinates to their votes.
        receptive_field: ``((y_0, dy), (x_0, dx))``, the scaled centre of the first child's
            receptive field and the step from one grid row (column) to the next, or ``None``
            for the grid's cell centres (see above).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: :class:`MatrixCapsules` with poses :math:`(B, N_{in}, H, W, 16)` and
          activations :math:`(B, N_{in}, H, W)`.
        - Output: :class:`MatrixCapsules` with poses :math:`(B, K, 16)` and activations
          :math:`(B, K)` (the class scores).

    Examples:
        >>> import torch
        >>> from torchcaps.layers import ClassMatrixCaps, MatrixCapsules
        >>> x = MatrixCapsules(torch.randn(2, 16, 3, 3, 16), torch.rand(2, 16, 3, 3))
        >>> out = ClassMatrixCaps(16, 10)(x)
        >>> out.poses.shape, out.activations.shape
        (torch.Size([2, 10, 16]), torch.Size([2, 10]))
    """

    def __init__(
        self,
        in_capsules: int,
        out_capsules: int,
        routing: str | MatrixRouting = "em",
        routing_kwargs: dict[str, Any] | None = None,
        coordinate_addition: bool = True,
        *,
        receptive_field: ReceptiveField | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "ClassMatrixCaps"
        self.in_capsules = check_int("in_capsules", in_capsules, owner=owner)
        self.out_capsules = check_int("out_capsules", out_capsules, owner=owner)
        if not isinstance(coordinate_addition, bool):
            raise TypeError(
                f"{owner}: coordinate_addition must be a bool, "
                f"got {type(coordinate_addition).__name__}"
            )
        self.coordinate_addition = coordinate_addition
        self.receptive_field = _check_receptive_field(receptive_field, owner)
        self.routing = _routing(routing, routing_kwargs, out_capsules, owner)
        self.weight = nn.Parameter(
            torch.empty(in_capsules, out_capsules, POSE, POSE, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Draw the matrices from :math:`\mathcal{N}(0, 0.01^2)`; reset the routing.

        0.01 is the official code's standard deviation for class capsules.
        """
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        reset = getattr(self.routing, "reset_parameters", None)
        if callable(reset):
            reset()

    def extra_repr(self) -> str:
        return (
            f"in_capsules={self.in_capsules}, out_capsules={self.out_capsules}, "
            f"coordinate_addition={self.coordinate_addition}, "
            f"receptive_field={self.receptive_field}"
        )

    def coordinates(
        self,
        height: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> tuple[Tensor, Tensor]:
        """The scaled receptive-field centres of a ``height x width`` grid's rows and columns.

        Returns ``(rows, cols)``, tensors of shape ``(height,)`` and ``(width,)``.
        """
        if self.receptive_field is None:
            (y0, dy), (x0, dx) = (0.5 / height, 1.0 / height), (0.5 / width, 1.0 / width)
        else:
            (y0, dy), (x0, dx) = self.receptive_field
        rows = y0 + dy * torch.arange(height, device=device, dtype=dtype)
        return rows, x0 + dx * torch.arange(width, device=device, dtype=dtype)

    def votes(self, poses: Tensor) -> Tensor:
        """Votes ``(B, H * W * N_in, K, 16)`` of a pose grid ``(B, N_in, H, W, 16)``.

        Children are ordered (row, column, type); the coordinates are added when enabled.
        """
        b, n, h, w, _ = poses.shape
        children = poses.permute(0, 2, 3, 1, 4).reshape(b * h * w, n, POSE_DIM)
        v = _votes(children, self.weight).view(b, h, w, n, self.out_capsules, POSE_DIM)
        if self.coordinate_addition:
            row, col = self.coordinates(h, w, device=v.device, dtype=v.dtype)
            offset = torch.zeros(h, w, POSE_DIM, device=v.device, dtype=v.dtype)
            offset[:, :, POSE - 1] = row.view(h, 1)  # entry (0, 3)
            offset[:, :, 2 * POSE - 1] = col.view(1, w)  # entry (1, 3)
            v = v + offset.view(1, h, w, 1, 1, POSE_DIM)
        return v.reshape(b, h * w * n, self.out_capsules, POSE_DIM)

    def forward(self, x: MatrixCapsules) -> MatrixCapsules:
        """Vote with coordinates, route over every child of the grid."""
        owner = "ClassMatrixCaps"
        poses, acts = _check_grid(x, self.in_capsules, owner)
        b = poses.shape[0]
        votes = self.votes(poses)
        flat_acts = acts.permute(0, 2, 3, 1).reshape(b, -1)
        out_poses, out_acts = self.routing(votes, flat_acts)
        return MatrixCapsules(out_poses, out_acts)
