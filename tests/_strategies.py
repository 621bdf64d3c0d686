"""Hypothesis strategies and the call checker of the fuzz tests (``test_fuzz_*`` in each module's
test file).

Each fuzz case draws a call whose arguments are all valid, or valid but for exactly one argument
that is broken on purpose (a wrong dtype such as int, bool or complex, a wrong rank or size, a
negative or zero size, a non-tensor, NaN for a float option, an out-of-range class index).
:func:`check_call` checks the contract of every such call:

- all arguments valid: the call returns a result of the documented shape and dtype, finite
  whenever the inputs are finite (zero vectors, tiny and huge magnitudes included);
- one argument broken: the call raises :class:`ValueError` (e.g. ``ShapeError``) or
  :class:`TypeError` whose message contains that argument's name;
- inputs holding NaN/inf are not an error: the call may return non-finite values or raise a
  ValueError naming the argument, but nothing else;
- never any other exception type (RuntimeError, IndexError, ...).

Each ``test_fuzz_*`` test runs up to ``max_examples`` examples of the loaded hypothesis profile
(``ci``: 40, derandomised, so CI tries the same cases on every run; ``HYPOTHESIS_PROFILE=dev``:
200); ``pytest --hypothesis-show-statistics`` prints how many each ran.

Known gaps of the library go in ``KNOWN_GAPS`` (the fuzz tolerates exactly those messages or
exception types), each with a ``test_gap_*`` test marked ``xfail(strict=True)``. It is empty now:
the ``test_gap_*`` tests next to the fuzz tests are regression tests for the gaps fuzzing found
and that were fixed, including edge cases the strategies do not draw.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

from _helpers import finite

__all__ = [
    "BAD_DTYPES",
    "BAD_FLOATS",
    "BAD_INTS",
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "MODULE_DTYPES",
    "NON_TENSORS",
    "RAISED",
    "bad_tensors",
    "check_call",
    "check_margin",
    "finite",
    "margin_case",
    "names",
    "positive_shape",
    "real_tensors",
    "small_shape",
]

# -- the call checker ----------------------------------------------------------------------------
# Argument name -> the names an error message may use for it (forward's ``x`` is "input").
ALIASES = {"x": ("input",)}

# Known gaps of the library: (target, argument) -> regexes of "ExceptionType: message" the fuzz
# tolerates for now, each with a strict xfail test. Empty: every gap found so far is fixed, and
# the former gaps are kept as ``test_gap_*`` regression tests next to the fuzz tests.
KNOWN_GAPS: dict[tuple[str, str], tuple[str, ...]] = {}


def _known_gap(target: str, arg: str, exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(re.search(p, text) for p in KNOWN_GAPS.get((target, arg), ()))


def names(message: str, arg: str) -> bool:
    """Whether ``message`` names ``arg`` (or an alias) as a word, e.g. ``v`` but not in ``dev``."""
    return any(
        re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message)
        for n in (arg, *ALIASES.get(arg, ()))
    )


class _Raised:
    """Marker for a call that raised an accepted ValueError/TypeError."""


RAISED = _Raised()


def check_call(
    target: str,
    fn: Callable[[], Any],
    broken: str | None,
    kind: str = "",
    *,
    nonfinite: str | None = None,
) -> Any:
    """Run ``fn`` under the contract; return its result or ``RAISED``.

    ``broken``: the argument broken on purpose (None: all valid). ``nonfinite``: the argument
    holding NaN/inf values (a ValueError naming it is then allowed, not required).
    """
    try:
        out = fn()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        allowed = broken if broken is not None else nonfinite
        if allowed is None:
            raise AssertionError(f"{target}: a valid call raised {exc!r}") from exc
        if nonfinite is not None and broken is None and not isinstance(exc, ValueError):
            raise AssertionError(f"{target}: NaN/inf in {nonfinite} raised {exc!r}") from exc
        if not names(msg, allowed) and not _known_gap(target, allowed, exc):
            raise AssertionError(
                f"{target}: error for broken {allowed!r} ({kind}) does not name it: {exc!r}"
            ) from exc
        return RAISED
    except Exception as exc:
        if broken is not None and _known_gap(target, broken, exc):
            return RAISED
        raise AssertionError(
            f"{target}: {type(exc).__name__} instead of ValueError/TypeError "
            f"(broken={broken!r}, {kind}): {exc}"
        ) from exc
    if broken is not None:
        raise AssertionError(f"{target}: broken argument {broken!r} ({kind}) was accepted")
    return out


# -- strategies ----------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BAD_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
# Magnitudes per dtype, chosen so that every result is representable in the dtype.
SCALES = {
    torch.float32: (0.0, 1e-30, 1e-3, 1.0, 1e4, 1e6),
    torch.float64: (0.0, 1e-30, 1e-3, 1.0, 1e4, 1e6),
    torch.bfloat16: (0.0, 1e-3, 1.0, 1e3),
    torch.float16: (0.0, 1e-3, 1.0, 4.0),
}
BAD_INTS = (0, -1, -7, 1.5, 2.0, True, None, "3")
BAD_FLOATS = (float("nan"), float("inf"), float("-inf"), "0.5", None, True)
NON_TENSORS = (None, 1.0, [1.0, 2.0], (0.5,), "tensor", range(3))
MODULE_DTYPES = (torch.float32, torch.float64)


@st.composite
def real_tensors(
    draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, *, nonfinite: bool = False
) -> torch.Tensor:
    """A tensor of ``shape``: random values at a drawn scale, some capsules zeroed, and NaN/inf
    sprinkled in when ``nonfinite``."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from(SCALES[dtype]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if x.numel() and draw(st.booleans()):  # zero vectors along the last axis (zero capsules)
        x = x * (torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64) > 0.4)
    if nonfinite and x.numel():
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), float("-inf")])
            )
    return x.to(dtype)


@st.composite
def bad_tensors(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[Any, str]:
    """Something that is not a real floating-point tensor; returns (value, kind)."""
    if draw(st.booleans()):
        dtype = draw(st.sampled_from(BAD_DTYPES))
        return torch.zeros(shape, dtype=dtype), f"dtype {dtype}"
    value = draw(st.sampled_from(NON_TENSORS))
    return value, f"non-tensor {type(value).__name__}"


def small_shape(min_rank: int = 0, max_rank: int = 4, max_side: int = 4) -> st.SearchStrategy:
    return st.lists(st.integers(0, max_side), min_size=min_rank, max_size=max_rank).map(tuple)


def positive_shape(rank: int, max_side: int = 4) -> st.SearchStrategy:
    return st.tuples(*([st.integers(1, max_side)] * rank))


@st.composite
def margin_case(draw: st.DrawFn) -> dict[str, Any]:
    """Arguments of margin_loss (lengths, target, options) with at most one broken."""
    names = ["lengths", "target", "target", "m_pos", "m_neg", "lambda_", "reduction"]
    broken = draw(st.sampled_from([None, None, None, *names]), label="broken")
    b = draw(st.integers(0, 4), label="B")
    k = draw(st.integers(1, 6), label="K")
    dtype = draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    nonfinite = broken is None and draw(st.integers(0, 5)) == 0
    lengths: Any = draw(real_tensors((b, k), dtype, nonfinite=nonfinite), label="lengths").abs()
    if draw(st.booleans()):
        target: Any = torch.tensor(
            draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)),
            dtype=draw(st.sampled_from(INDEX_DTYPES)),
        )
    else:
        target = torch.tensor(
            draw(
                st.lists(
                    st.lists(st.integers(0, 1), min_size=k, max_size=k), min_size=b, max_size=b
                )
            ),
            dtype=draw(st.sampled_from((torch.float32, torch.int64, torch.bool, torch.float16))),
        ).reshape(b, k)
    opts: dict[str, Any] = {
        "m_pos": draw(st.sampled_from([0.9, 0.5, 1, 2.0, -0.5])),
        "m_neg": draw(st.sampled_from([0.1, 0.0, 0.5, -1])),
        "lambda_": draw(st.sampled_from([0.5, 0.0, 1, 3.0])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }
    kind = ""
    if broken == "lengths":
        choice = draw(st.integers(0, 2))
        if choice == 0:
            lengths, kind = draw(bad_tensors((b, k)))
        else:
            shape = draw(st.sampled_from([(b,), (b, k, 1), ()]))
            lengths, kind = torch.rand(shape, dtype=dtype), f"shape {shape}"
    elif broken == "target":
        choice = draw(st.integers(0, 5))
        if choice == 0:
            target, kind = draw(st.sampled_from(NON_TENSORS)), "non-tensor"
        elif choice == 1:  # class index out of range
            bad = draw(st.sampled_from([k, k + 3, -1]))
            target = torch.zeros(max(b, 1), dtype=torch.int64)
            target[0] = bad
            kind = f"index {bad} for K={k}"
            lengths = torch.rand(max(b, 1), k, dtype=dtype)
        elif choice == 2:  # float/bool/complex class indices
            dt = draw(st.sampled_from([torch.float32, torch.bool, torch.complex64]))
            target, kind = torch.zeros(b, dtype=dt), f"1-d {dt}"
        elif choice == 3:  # wrong shape
            shape = draw(st.sampled_from([(b + 1,), (b, k + 1), (b, k, 1), ()]))
            target, kind = torch.zeros(shape, dtype=torch.int64), f"shape {shape}"
        elif choice == 4:  # multi-hot with values other than 0/1
            bad = draw(st.sampled_from([0.5, 2.0, -1.0, float("nan")]))
            target = torch.zeros(max(b, 1), k)
            target[0, 0] = bad
            lengths = torch.rand(max(b, 1), k, dtype=dtype)
            kind = f"multi-hot value {bad}"
        else:
            target, kind = torch.zeros(b, k, dtype=torch.complex64), "complex multi-hot"
    elif broken in ("m_pos", "m_neg"):
        opts[broken] = draw(st.sampled_from(BAD_FLOATS))
        kind = repr(opts[broken])
    elif broken == "lambda_":
        opts[broken] = draw(st.sampled_from([-0.5, -1, *BAD_FLOATS]))
        kind = repr(opts[broken])
    elif broken == "reduction":
        opts[broken] = draw(st.sampled_from(["avg", "MEAN", "", None, 1]))
        kind = repr(opts[broken])
    return {
        "broken": broken,
        "kind": kind,
        "nonfinite": nonfinite,
        "lengths": lengths,
        "target": target,
        "opts": opts,
    }


def check_margin(case: dict[str, Any], out: Any) -> None:
    if out is RAISED:
        return
    lengths, opts = case["lengths"], case["opts"]
    expected = (lengths.shape[0],) if opts["reduction"] == "none" else ()
    # losses are returned in float32 at least
    assert tuple(out.shape) == expected
    assert out.dtype == torch.promote_types(lengths.dtype, torch.float32)
    finite_inputs = not case["nonfinite"]
    empty_mean = opts["reduction"] == "mean" and lengths.shape[0] == 0
    if finite_inputs and not empty_mean:  # the mean of an empty batch is NaN, as in torch
        assert finite(out) and bool((out >= 0).all())
