"""torchcaps.models.capsnet: the paper's CapsNet, built by name (``get_model("capsnet_mnist")``).

Its numbers (parameter counts, exact values against the float64 references), numerics under
autocast, determinism, torch.compile, torch.export and TorchScript. The contract every registered
model follows is checked in test_contracts.py.

Timings on 2 busy CPU cores: the 200-step bf16 loop uses a reduced CapsNet (8 conv channels,
2 x 6 x 6 primary capsules); the paper-size model is checked for a few steps. ``torch.compile``
runs with ``backend="aot_eager"`` (inductor needs ~40 s to compile here) and ``fullgraph=True``,
which fails on any graph break.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _helpers import CUDA_ONLY, count_parameters, grads_finite
from reference import routing_ref, squash_ref
from torchcaps import (
    Conv2dCaps,
    DenseCaps,
    DynamicRouting,
    MarginLoss,
    MaskedDecoder,
    ReconstructionLoss,
    capsule_lengths,
    squash,
)
from torchcaps.errors import ShapeError
from torchcaps.functional import margin_loss, reconstruction_loss
from torchcaps.models import CapsNet, CapsuleOutput, capsnet_mnist, get_model

pytestmark = pytest.mark.usefixtures("one_thread")


def small_capsnet(iterations: int = 3) -> CapsNet:
    """The paper's architecture at a reduced width: 28x28 input, 8 conv channels, 72 capsules."""
    return CapsNet(
        conv_channels=8, primary_capsules=2, decoder_hidden=(32, 64), routing_iterations=iterations
    )


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, torch.dtype]]:
    out = model(x, y)
    margin = MarginLoss()(out.scores, y)
    rec = ReconstructionLoss()(out.reconstruction, x)
    dtypes = {"lengths": out.scores.dtype, "margin": margin.dtype, "recon_loss": rec.dtype}
    return margin + rec, dtypes


# -- the paper's model -----------------------------------------------------------------------------
def test_paper_model_parameter_counts() -> None:
    model = get_model("capsnet_mnist")
    encoder = (model.conv1, model.primary, model.digits)
    n_enc = sum(count_parameters(m) for m in encoder)
    assert n_enc == 6_804_224  # 6.8M as in the paper
    assert count_parameters(model) == n_enc + count_parameters(model.decoder) == 8_215_568  # 8.2M
    assert count_parameters(get_model("capsnet_mnist", reconstruction=False)) == 6_804_224


def test_paper_model() -> None:
    model = get_model("capsnet_mnist")
    out = model(torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))
    assert isinstance(out, CapsuleOutput)
    assert out.scores.shape == (2, 10) and out.capsules.shape == (2, 10, 16)
    assert out.reconstruction.shape == (2, 1, 28, 28)
    torch.testing.assert_close(out.scores, capsule_lengths(out.capsules))
    assert model.digits.routing.iterations == 3
    bare = get_model("capsnet_mnist", reconstruction=False)(torch.rand(3, 1, 28, 28))
    assert bare.reconstruction is None and bare.scores.shape == (3, 10)


def test_paper_model_is_built_from_the_papers_layers() -> None:
    model = capsnet_mnist()
    assert isinstance(model, CapsNet)
    assert (model.in_shape, model.num_classes) == ((1, 28, 28), 10)
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (1, 256, (9, 9))
    primary = model.primary
    assert isinstance(primary, Conv2dCaps)
    assert (primary.in_channels, primary.out_capsules, primary.capsule_dim) == (256, 32, 8)
    assert (primary.kernel_size, primary.stride) == ((9, 9), (2, 2))
    digits = model.digits
    assert isinstance(digits, DenseCaps) and isinstance(digits.routing, DynamicRouting)
    assert (digits.in_capsules, digits.in_dim, digits.out_capsules, digits.out_dim) == (
        1152,
        8,
        10,
        16,
    )
    decoder = model.decoder
    assert isinstance(decoder, MaskedDecoder)
    assert (decoder.num_capsules, decoder.capsule_dim, decoder.out_shape) == (10, 16, (1, 28, 28))
    sizes = [m.out_features for m in decoder.net if isinstance(m, nn.Linear)]
    assert sizes == [512, 1024, 784]
    assert capsnet_mnist(reconstruction=False).decoder is None


def test_builder_keyword_arguments_override_the_defaults() -> None:
    model = get_model("capsnet_mnist", routing_iterations=1, class_dim=8, conv_impl="native")
    assert model.digits.routing.iterations == 1 and model.digits.out_dim == 8
    assert model.primary.conv_impl == "native"
    assert model(torch.rand(1, 1, 28, 28)).capsules.shape == (1, 10, 8)


# -- exact values against the float64 references ------------------------------------------------
def _reference_forward(model: CapsNet, x: Tensor, target: Tensor) -> tuple[Tensor, ...]:
    """conv1 + ReLU, the primary convolution grouped into squashed capsules (squash_ref),
    u_hat[j|i] = W_ij u_i with explicit loops, Procedure 1 (routing_ref), the decoder's MLP on
    the capsules masked by ``target``."""
    h = F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias))
    p = model.primary
    y = F.conv2d(h, p.conv.weight, p.conv.bias, stride=p.stride, padding=p.padding)
    b, _, gh, gw = y.shape
    n, d = p.out_capsules, p.capsule_dim
    u = torch.empty(b, n, gh, gw, d, dtype=torch.float64)
    for k in range(n):
        for i in range(gh):
            for j in range(gw):
                u[:, k, i, j] = squash_ref(y[:, k * d : (k + 1) * d, i, j])
    u = u.reshape(b, n * gh * gw, d)  # capsule order: type, row, column
    W = model.digits.weight_matrices.double()  # (N_in, N_out, D_out, D_in)
    u_hat = torch.einsum("ijed,bid->bije", W, u)
    v, c = routing_ref(u_hat, model.digits.routing.iterations)
    masked = torch.zeros_like(v)
    masked[torch.arange(b), target] = v[torch.arange(b), target]
    layers = [m for m in model.decoder.net if isinstance(m, nn.Linear)]
    z = masked.flatten(1)
    for k, layer in enumerate(layers):
        z = F.linear(z, layer.weight, layer.bias)
        z = torch.relu(z) if k < len(layers) - 1 else torch.sigmoid(z)
    return v.norm(dim=-1), v, c, z.view(b, *model.in_shape)


def test_small_capsnet_matches_the_float64_reference() -> None:
    model = CapsNet(
        (1, 12, 12),
        3,
        conv_channels=4,
        conv_kernel=5,
        primary_capsules=2,
        primary_dim=4,
        primary_kernel=3,
        primary_stride=2,
        class_dim=5,
        decoder_hidden=(7,),
    ).double()
    with torch.no_grad():
        model.digits.weight.normal_(0, 0.5)  # away from the uniform coupling of tiny weights
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    target = torch.tensor([2, 0])
    out = model(x, target)
    _, c = model.digits(model.primary(F.relu(model.conv1(x))), return_coupling=True)
    scores, v, c_ref, recon = _reference_forward(model, x, target)
    torch.testing.assert_close(out.scores, scores, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.capsules, v, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.reconstruction, recon, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(c_ref, torch.full_like(c_ref, 1 / 3))  # routing did something


def test_decoder_is_masked_by_the_target_or_the_prediction() -> None:
    model = small_capsnet().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        model.digits.weight.normal_(0, 0.5)  # capsules long enough to tell the masks apart
        free = model(x)
        predicted = model(x, free.scores.argmax(dim=1))
        other = model(x, (free.scores.argmax(dim=1) + 1) % 10)
    torch.testing.assert_close(free.reconstruction, predicted.reconstruction)
    torch.testing.assert_close(free.scores, other.scores)  # the target only masks the decoder
    assert not torch.allclose(free.reconstruction, other.reconstruction)


def test_bad_input() -> None:
    model = small_capsnet()
    with pytest.raises(
        ShapeError, match=r"CapsNet expected x of shape \(B, 1, 28, 28\), got \(2, 28, 28\)"
    ):
        model(torch.rand(2, 28, 28))
    with pytest.raises(ShapeError, match=r"got \(2, 1, 27, 28\)"):
        model(torch.rand(2, 1, 27, 28))
    with pytest.raises(TypeError, match="CapsNet: x must be a real floating-point tensor"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"class indices in \[0, 9\], got values in \[0, 10\]"):
        model(torch.rand(2, 1, 28, 28), torch.tensor([0, 10]))


def test_bad_config() -> None:
    with pytest.raises(TypeError, match=r"CapsNet: in_shape must be a triple \(C, H, W\)"):
        CapsNet((28, 28))
    with pytest.raises(ValueError, match=r"CapsNet: in_shape\[0\] must be >= 1, got 0"):
        CapsNet((0, 28, 28))
    with pytest.raises(ValueError, match=r"CapsNet: in_shape \(1, 12, 12\) is too small"):
        CapsNet((1, 12, 12))
    with pytest.raises(ValueError, match="CapsNet: num_classes must be >= 1, got 0"):
        CapsNet(num_classes=0)
    with pytest.raises(TypeError, match="CapsNet: reconstruction must be a bool, got str"):
        CapsNet(reconstruction="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "conv_channels",
        "conv_kernel",
        "primary_capsules",
        "primary_dim",
        "primary_kernel",
        "primary_stride",
        "class_dim",
        "routing_iterations",
    ],
)
def test_bad_size_arguments_are_named_by_capsnet(name: str) -> None:
    # Each size is checked by CapsNet under its own name (not by the layer it is passed to).
    with pytest.raises(ValueError, match=rf"^CapsNet: {name} must be >= 1, got 0$"):
        CapsNet(**{name: 0})
    with pytest.raises(TypeError, match=rf"^CapsNet: {name} must be an int, got float 2.5$"):
        CapsNet(**{name: 2.5})


def test_paper_model_bf16_autocast_forward() -> None:
    model = get_model("capsnet_mnist", reconstruction=False)
    x = torch.rand(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x).capsules
    assert v.dtype == torch.float32  # routing ran in float32
    torch.testing.assert_close(v, model(x).capsules, atol=2e-3, rtol=5e-2)


# -- numerics: autocast -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device, amp_dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=CUDA_ONLY),
        pytest.param("cuda", torch.float16, marks=CUDA_ONLY),
    ],
    ids=["cpu-bf16", "cuda-bf16", "cuda-fp16"],
)
def test_amp_training_stays_finite_for_200_steps(device: str, amp_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = small_capsnet().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # fp16 needs loss scaling (GradScaler); bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    g = torch.Generator(device=device).manual_seed(0)
    losses = []
    for step in range(200):
        x = torch.rand(4, 1, 28, 28, generator=g, device=device)
        y = torch.randint(0, 10, (4,), generator=g, device=device)
        with torch.autocast(device, dtype=amp_dtype):
            loss, dtypes = _loss(model, x, y)
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        assert set(dtypes.values()) == {torch.float32}, dtypes
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        assert grads_finite(model) or scaler.is_enabled(), f"step {step}: non-finite gradient"
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-20:]) < sum(losses[:20])  # it learns something, even from noise


def test_float32_inside_autocast() -> None:
    """Routing, capsule lengths and losses are computed and returned in float32 under autocast."""
    torch.manual_seed(0)
    model = small_capsnet()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = model.primary(F.relu(model.conv1(x)))
        assert u.dtype == torch.bfloat16  # convolutions run in bf16 ...
        v = model.digits(u)
        assert v.dtype == torch.float32  # ... DenseCaps' predictions and routing in float32
        s = torch.randn(2, 10, 16)
        assert squash(s).dtype == torch.float32
        assert DynamicRouting(3)(torch.randn(2, 72, 10, 16)).dtype == torch.float32
        lengths = capsule_lengths(v)
        recon = model.decoder(v, y)
        assert recon.dtype == torch.bfloat16  # the decoder's Linear layers run in bf16
        assert lengths.dtype == torch.float32
        assert margin_loss(lengths, y).dtype == torch.float32
        assert reconstruction_loss(recon, x).dtype == torch.float32  # promoted with the target
    with torch.no_grad():
        ref_v = model.digits(model.primary(F.relu(model.conv1(x))))
    torch.testing.assert_close(v.detach(), ref_v, atol=5e-3, rtol=5e-2)


def test_paper_model_bf16_steps_match_float32() -> None:
    """The full-size CapsNet: a bf16 autocast step's loss is within 2% of the float32 step's."""
    torch.manual_seed(0)
    model = get_model("capsnet_mnist")
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([1, 8])
    loss32, _ = _loss(model, x, y)
    (g32,) = torch.autograd.grad(loss32, [model.primary.conv.weight])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16, dtypes = _loss(model, x, y)
        assert set(dtypes.values()) == {torch.float32}, dtypes
        assert torch.isfinite(loss16)
        opt.zero_grad(set_to_none=True)
        loss16.backward()
        assert grads_finite(model), f"step {step}"
        if step == 0:
            # Stated tolerance: bf16 keeps 8 bits of mantissa; the loss (margin + reconstruction,
            # both computed in float32 from bf16 activations) agrees to 2 %.
            torch.testing.assert_close(loss16.detach(), loss32.detach(), rtol=2e-2, atol=1e-3)
            g16 = model.primary.conv.weight.grad
            cos = F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
            assert cos > 0.95, f"bf16 gradient direction differs: cosine {float(cos):.3f}"
        opt.step()


# -- determinism --------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _train_losses(steps: int = 3) -> list[float]:
    torch.manual_seed(123)
    model = small_capsnet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(123)
    losses = []
    for _ in range(steps):
        x = torch.rand(4, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss, _ = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_deterministic_algorithms_give_bitwise_identical_runs() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with _deterministic():
        first = _train_losses()
        second = _train_losses()
    assert torch.are_deterministic_algorithms_enabled() == before  # flag restored
    assert first == second  # bitwise: float equality of every step's loss


# -- torch.compile ------------------------------------------------------------------------------
def test_compile_paper_model_inference_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = get_model("capsnet_mnist").eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert isinstance(out, CapsuleOutput)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.capsules, ref.capsules, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.reconstruction, ref.reconstruction, atol=1e-6, rtol=1e-5)


def test_compile_training_loss_has_no_graph_breaks() -> None:
    """Forward + margin + reconstruction loss with labels (the training graph) in one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = small_capsnet()

    def step(x: Tensor, y: Tensor) -> Tensor:
        return _loss(model, x, y)[0]

    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 9])
    explanation = torch._dynamo.explain(step)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x, y)
    torch.testing.assert_close(loss, step(x, y), atol=1e-6, rtol=1e-5)


# -- torch.export, TorchScript ------------------------------------------------------------------
@pytest.mark.parametrize("reconstruction", [False, True], ids=["lengths", "lengths+recon"])
def test_torch_export_matches_eager(reconstruction: bool) -> None:
    model = get_model("capsnet_mnist", reconstruction=reconstruction).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    x = torch.rand(5, 1, 28, 28)  # another batch size than the example's
    with torch.no_grad():
        got, expected = program.module()(x), model(x)
    assert isinstance(got, CapsuleOutput)
    assert (got.reconstruction is None) == (not reconstruction)
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_jit_trace_works() -> None:
    model = get_model("capsnet_mnist").eval()
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream; the shape checks of the library emit
        # TracerWarnings (they only guard error paths). See examples/export_onnx.py.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (torch.rand(2, 1, 28, 28),))
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        got, expected = traced(x), model(x)
    assert len(got) == 3  # a plain tuple: TorchScript drops the field names
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_multimnist_model_reconstructs_each_digit_from_its_own_capsule() -> None:
    model = get_model("capsnet_multimnist")
    assert model.in_shape == (1, 36, 36)
    assert sum(p.numel() for p in model.parameters()) == 11_361_808
    assert model.digits.in_capsules == 32 * 10 * 10  # a 10x10 primary grid
    model.eval()
    x = torch.rand(3, 1, 36, 36)
    first, second = torch.tensor([1, 4, 9]), torch.tensor([7, 0, 2])
    with torch.no_grad():
        both = model(x, torch.stack([first, second], dim=1)).reconstruction
        one = model(x, first).reconstruction
        other = model(x, second).reconstruction
    assert both.shape == (3, 2, 1, 36, 36)
    torch.testing.assert_close(both[:, 0], one)  # each digit as if it were the only target
    torch.testing.assert_close(both[:, 1], other)
    assert not torch.allclose(other, one)
