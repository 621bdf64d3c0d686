"""torchcaps._checks: the shared argument and shape validation behind every error message."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from torchcaps._checks import check_float, check_int, check_shape
from torchcaps.errors import ShapeError


# -- check_shape -----------------------------------------------------------------------------------
def test_binds_every_named_dimension() -> None:
    bound = check_shape(torch.zeros(2, 5, 3), "B K D", name="v", owner="f")
    assert bound == {"B": 2, "K": 5, "D": 3}
    assert all(isinstance(v, int) for v in bound.values())


def test_given_sizes_are_checked_and_shown() -> None:
    assert check_shape(torch.zeros(2, 5, 3), "B K D", name="v", owner="f", D=3) == {
        "B": 2,
        "K": 5,
        "D": 3,
    }
    with pytest.raises(
        ShapeError, match=r"^f expected v of shape \(B, 10, 16\), got \(2, 10, 8\)$"
    ):
        check_shape(torch.zeros(2, 10, 8), "B K D", name="v", owner="f", K=10, D=16)


def test_fixed_sizes_are_numbers_and_not_bound() -> None:
    assert check_shape(torch.zeros(4, 3), "B 3", name="x", owner="g") == {"B": 4}
    with pytest.raises(ShapeError, match=r"^g expected x of shape \(B, 3\), got \(4, 2\)$"):
        check_shape(torch.zeros(4, 2), "B 3", name="x", owner="g")


def test_a_repeated_name_must_have_one_size() -> None:
    assert check_shape(torch.zeros(2, 3, 3), "B N N", name="a", owner="h") == {"B": 2, "N": 3}
    with pytest.raises(ShapeError, match=r"^h expected a of shape \(B, N, N\), got \(2, 3, 4\)$"):
        check_shape(torch.zeros(2, 3, 4), "B N N", name="a", owner="h")
    # a given size applies to every occurrence
    with pytest.raises(ShapeError, match=r"expected a of shape \(B, 3, 3\), got \(2, 4, 4\)"):
        check_shape(torch.zeros(2, 4, 4), "B N N", name="a", owner="h", N=3)


def test_wrong_rank() -> None:
    with pytest.raises(ShapeError, match=r"^k expected t of shape \(B, K\), got \(2, 10, 1\)$"):
        check_shape(torch.zeros(2, 10, 1), "B K", name="t", owner="k")
    with pytest.raises(ShapeError, match=r"expected t of shape \(B, K\), got \(\)"):
        check_shape(torch.tensor(1.0), "B K", name="t", owner="k")


def test_one_dimension_is_written_as_a_tuple() -> None:
    with pytest.raises(ShapeError, match=r"^m expected target of shape \(2,\), got \(3,\)$"):
        check_shape(torch.zeros(3), "B", name="target", owner="m", B=2)


def test_empty_ok() -> None:
    # only B may be empty by default
    assert check_shape(torch.zeros(0, 4), "B K", name="x", owner="o") == {"B": 0, "K": 4}
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, K\), got \(2, 0\)"):
        check_shape(torch.zeros(2, 0), "B K", name="x", owner="o")
    # empty_ok names the dimensions that may be 0
    assert check_shape(torch.zeros(1, 3, 0, 5), "B C H W", name="x", owner="o", empty_ok=("H",))
    with pytest.raises(ShapeError, match=r"got \(0, 3, 2, 5\)"):
        check_shape(torch.zeros(0, 3, 2, 5), "B C H W", name="x", owner="o", empty_ok=("H",))


def test_note_follows_the_expected_shape() -> None:
    with pytest.raises(
        ShapeError, match=r"^f expected lengths of shape \(B, K\) with K >= 1, got \(2, 0\)$"
    ):
        check_shape(torch.zeros(2, 0), "B K", name="lengths", owner="f", note=" with K >= 1")


def test_non_tensor_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^f: v must be a torch.Tensor, got list$"):
        check_shape([1.0, 2.0], "B", name="v", owner="f")


def test_shape_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        check_shape(torch.zeros(2), "B K", name="x", owner="f")


class _Scale(nn.Module):
    """Uses the bound (symbolic) batch size in the computation."""

    def forward(self, x: Tensor) -> Tensor:
        size = check_shape(x, "B 3", name="x", owner="_Scale")
        return x * size["B"] + x.new_ones(size["B"], 1)


def test_export_keeps_the_batch_dimension_symbolic() -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_Scale(), (torch.zeros(2, 3),), dynamic_shapes=({0: batch},))
    run = program.module()
    for b in (3, 7):  # neither is the example's batch size: specialised, both would fail
        x = torch.rand(b, 3)
        torch.testing.assert_close(run(x), x * b + 1)
    # one symbol for the batch, with the range asked for; the fixed size is a guard of the program
    assert [(r.lower, r.upper) for r in program.range_constraints.values()] == [(1, 64)]
    with pytest.raises(AssertionError, match=r"x.size\(\)\[1\] == 3"):
        run(torch.rand(2, 4))


def test_compile_with_dynamic_shapes_keeps_the_batch_dimension_symbolic() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_Scale(), backend="aot_eager", fullgraph=True, dynamic=True)
    for b in (3, 7):
        x = torch.rand(b, 3)
        torch.testing.assert_close(compiled(x), x * b + 1)
    # Without fullgraph the error path (a message formatted from symbolic sizes) falls back to
    # eager mode and raises the same ShapeError. (With fullgraph=True it is a dynamo error.)
    torch._dynamo.reset()
    compiled = torch.compile(_Scale(), backend="aot_eager", dynamic=True)
    with pytest.raises(ShapeError, match=r"_Scale expected x of shape \(B, 3\), got \(2, 4\)"):
        compiled(torch.rand(2, 4))


# -- scalar checks -----------------------------------------------------------------------------
def test_check_int() -> None:
    assert check_int("n", 3, owner="f") == 3
    assert check_int("padding", 0, minimum=0, owner="f") == 0
    with pytest.raises(TypeError, match=r"^f: n must be an int, got bool True$"):
        check_int("n", True, owner="f")
    with pytest.raises(TypeError, match=r"^n must be an int, got float 2.0$"):
        check_int("n", 2.0)
    with pytest.raises(ValueError, match=r"^f: n must be >= 1, got 0$"):
        check_int("n", 0, owner="f")


def test_check_float() -> None:
    assert check_float("eps", 1, minimum=0.0, strict_min=True) == 1.0
    assert isinstance(check_float("eps", 1), float)
    with pytest.raises(ValueError, match=r"^f: eps must be > 0.0, got 0.0$"):
        check_float("eps", 0.0, minimum=0.0, strict_min=True, owner="f")
    with pytest.raises(ValueError, match=r"w must be >= 0.0, got -1.0"):
        check_float("w", -1.0, minimum=0.0)
    with pytest.raises(ValueError, match=r"m must be <= 1.0, got 2.0"):
        check_float("m", 2.0, maximum=1.0)
    with pytest.raises(ValueError, match="m must be finite, got nan"):
        check_float("m", float("nan"))
    with pytest.raises(TypeError, match="m must be a float, got str '0.5'"):
        check_float("m", "0.5")
