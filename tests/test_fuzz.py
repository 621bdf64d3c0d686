"""Hypothesis fuzzing of every public constructor and forward of torchcaps.

Each case draws a call whose arguments are all valid, or valid but for exactly one argument that
is broken on purpose (a wrong dtype such as int, bool or complex, a wrong rank or size, a
negative or zero size, a non-tensor, NaN for a float option, an out-of-range class index).
The contract checked for every call:

- all arguments valid: the call returns a result of the documented shape and dtype, finite
  whenever the inputs are finite (zero vectors, tiny and huge magnitudes included);
- one argument broken: the call raises :class:`ValueError` (e.g. ``ShapeError``) or
  :class:`TypeError` whose message contains that argument's name;
- inputs holding NaN/inf are not an error: the call may return non-finite values or raise a
  ValueError naming the argument, but nothing else;
- never any other exception type (RuntimeError, IndexError, ...).

How many cases CI tries: each of the 12 ``test_fuzz_*`` tests runs up to ``max_examples``
examples of the loaded hypothesis profile (``ci``: 40, derandomised, so CI tries the same cases
on every run; ``HYPOTHESIS_PROFILE=dev``: 200). With ``ci`` that is about 500 examples and 580
checked calls (a module test checks its constructor and its forward) in about 5 s. The session's
exact numbers are printed in pytest's terminal summary, e.g. ``torchcaps fuzz: 12 tests, 504
examples, 578 checked calls (Conv2dCaps: 74, ...)``, and :func:`test_fuzz_case_count`, the last
test of the file, checks that every selected fuzz test ran.

Known gaps of the library go in ``KNOWN_GAPS`` (the fuzz tolerates exactly those messages or
exception types), each with a ``test_gap_*`` test marked ``xfail(strict=True)``. It is empty now:
the ``test_gap_*`` tests are regression tests for the gaps fuzzing found and that were fixed,
including edge cases the strategies do not draw.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchcaps import (
    Conv2dCaps,
    DenseCaps,
    DynamicRouting,
    MarginLoss,
    MaskedDecoder,
    ReconstructionLoss,
    Routing,
    capsule_lengths,
    resolve_routing,
    squash,
)
from torchcaps.functional import margin_loss, mask_capsules, reconstruction_loss

# -- bookkeeping ---------------------------------------------------------------------------------
CASES: Counter[str] = Counter()
FUZZ_TARGETS = (
    "squash",
    "capsule_lengths",
    "margin_loss",
    "mask_capsules",
    "reconstruction_loss",
    "Conv2dCaps",
    "DenseCaps",
    "DynamicRouting",
    "MarginLoss",
    "ReconstructionLoss",
    "MaskedDecoder",
    "resolve_routing",
)


EXAMPLES: Counter[str] = Counter()  # examples run per fuzz test


def counted(test: Callable[..., None]) -> Callable[..., None]:
    """Count the examples hypothesis runs through ``test`` (apply below ``@given``)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        EXAMPLES[test.__name__] += 1
        test(*args, **kwargs)

    return wrapper


def _summary() -> str:
    per_target = ", ".join(f"{k}: {v}" for k, v in sorted(CASES.items()))
    return (
        f"torchcaps fuzz: {len(EXAMPLES)} tests, {sum(EXAMPLES.values())} examples, "
        f"{sum(CASES.values())} checked calls ({per_target})"
    )


class _CountReporter:
    """A pytest plugin object that prints the number of fuzz cases in the terminal summary."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if EXAMPLES:
            terminalreporter.write_line(_summary())


@pytest.fixture(scope="module", autouse=True)
def _report_case_count(request: pytest.FixtureRequest) -> Iterator[None]:
    reporter = _CountReporter()
    manager = request.config.pluginmanager
    if not manager.is_registered(reporter):
        manager.register(reporter, "torchcaps-fuzz-count")
    yield


# Argument name -> the names an error message may use for it (forward's ``x`` is "input").
ALIASES = {"x": ("input",)}

# Known gaps of the library: (target, argument) -> regexes of "ExceptionType: message" the fuzz
# tolerates for now, each with a strict xfail test. Empty: every gap found so far is fixed, and
# the former gaps are kept below as regression tests.
KNOWN_GAPS: dict[tuple[str, str], tuple[str, ...]] = {}


def _known_gap(target: str, arg: str, exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(re.search(p, text) for p in KNOWN_GAPS.get((target, arg), ()))


def _names(message: str, arg: str) -> bool:
    """Whether ``message`` names ``arg`` (or an alias) as a word, e.g. ``v`` but not in ``dev``."""
    return any(
        re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message)
        for n in (arg, *ALIASES.get(arg, ()))
    )


class _Raised:
    """Marker for a call that raised an accepted ValueError/TypeError."""


RAISED = _Raised()


def _call(
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
    CASES[target] += 1
    try:
        out = fn()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        allowed = broken if broken is not None else nonfinite
        if allowed is None:
            raise AssertionError(f"{target}: a valid call raised {exc!r}") from exc
        if nonfinite is not None and broken is None and not isinstance(exc, ValueError):
            raise AssertionError(f"{target}: NaN/inf in {nonfinite} raised {exc!r}") from exc
        if not _names(msg, allowed) and not _known_gap(target, allowed, exc):
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


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


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


# -- functional ----------------------------------------------------------------------------------
@given(st.data())
@counted
def test_fuzz_squash(data: st.DataObject) -> None:
    broken = data.draw(st.sampled_from([None, None, "s", "dim", "eps"]), label="broken")
    shape = data.draw(small_shape(min_rank=1), label="shape")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    nonfinite = broken is None and data.draw(st.integers(0, 4)) == 0
    s: Any = data.draw(real_tensors(shape, dtype, nonfinite=nonfinite), label="s")
    dim: Any = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    eps: Any = data.draw(st.sampled_from([1e-12, 1e-6, 1e-20, 1.0, 1]), label="eps")
    kind = ""
    if broken == "s":
        s, kind = data.draw(
            st.one_of(bad_tensors(shape), st.just((torch.tensor(1.0), "0-d tensor"))), label="s!"
        )
    elif broken == "dim":
        dim = data.draw(
            st.sampled_from([len(shape), -len(shape) - 1, 100, 1.0, True, None]), label="dim!"
        )
        kind = f"dim={dim!r}"
    elif broken == "eps":
        eps = data.draw(st.sampled_from([0.0, -1e-12, *BAD_FLOATS]), label="eps!")
        kind = f"eps={eps!r}"
    grad = broken is None and dtype in (torch.float32, torch.float64) and not nonfinite
    if grad:
        s = s.clone().requires_grad_(True)
    v = _call(
        "squash", lambda: squash(s, dim, eps), broken, kind, nonfinite="s" if nonfinite else None
    )
    if v is RAISED:
        return
    assert v.shape == s.shape and v.dtype == s.dtype
    if not nonfinite:
        assert _finite(v)
        if v.numel():
            assert bool((torch.linalg.vector_norm(v.double(), dim=dim) <= 1.0 + 1e-2).all())
    if grad and v.numel():
        (g,) = torch.autograd.grad(v.sum(), s)
        assert _finite(g), "squash: non-finite gradient for finite input"


@given(st.data())
@counted
def test_fuzz_capsule_lengths(data: st.DataObject) -> None:
    broken = data.draw(st.sampled_from([None, None, "v", "dim"]), label="broken")
    shape = data.draw(small_shape(min_rank=1), label="shape")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    nonfinite = broken is None and data.draw(st.integers(0, 4)) == 0
    v: Any = data.draw(real_tensors(shape, dtype, nonfinite=nonfinite), label="v")
    dim: Any = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    kind = ""
    if broken == "v":
        v, kind = data.draw(
            st.one_of(bad_tensors(shape), st.just((torch.tensor(1.0), "0-d tensor"))), label="v!"
        )
    elif broken == "dim":
        dim = data.draw(st.sampled_from([len(shape), -len(shape) - 1, 0.5, False, "x"]))
        kind = f"dim={dim!r}"
    out = _call(
        "capsule_lengths",
        lambda: capsule_lengths(v, dim),
        broken,
        kind,
        nonfinite="v" if nonfinite else None,
    )
    if out is RAISED:
        return
    expected = list(shape)
    del expected[dim]
    assert tuple(out.shape) == tuple(expected) and out.dtype == v.dtype
    if not nonfinite:
        assert _finite(out) and bool((out >= 0).all())


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


def _check_margin(case: dict[str, Any], out: Any) -> None:
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
        assert _finite(out) and bool((out >= 0).all())


@given(margin_case())
@counted
def test_fuzz_margin_loss(case: dict[str, Any]) -> None:
    out = _call(
        "margin_loss",
        lambda: margin_loss(case["lengths"], case["target"], **case["opts"]),
        case["broken"],
        case["kind"],
        nonfinite="lengths" if case["nonfinite"] else None,
    )
    _check_margin(case, out)


@given(margin_case())
@counted
def test_fuzz_margin_loss_module(case: dict[str, Any]) -> None:
    opts, broken = case["opts"], case["broken"]
    ctor_broken = broken if broken in opts else None
    loss = _call("MarginLoss", lambda: MarginLoss(**opts), ctor_broken, case["kind"])
    if loss is RAISED:
        return
    fwd_broken = None if broken in opts else broken
    out = _call(
        "MarginLoss",
        lambda: loss(case["lengths"], case["target"]),
        fwd_broken,
        case["kind"],
        nonfinite="lengths" if case["nonfinite"] else None,
    )
    _check_margin(case, out)
    if out is not RAISED and not case["nonfinite"]:
        expected = margin_loss(case["lengths"], case["target"], **opts)
        torch.testing.assert_close(out, expected, equal_nan=True)


@given(st.data())
@counted
def test_fuzz_mask_capsules(data: st.DataObject) -> None:
    broken = data.draw(st.sampled_from([None, None, "v", "target"]), label="broken")
    b = data.draw(st.integers(0, 4), label="B")
    k = data.draw(st.integers(1, 5), label="K")
    d = data.draw(st.integers(0, 4), label="D")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    v: Any = data.draw(real_tensors((b, k, d), dtype), label="v")
    target: Any = None
    if data.draw(st.booleans()):
        target = torch.tensor(
            data.draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)),
            dtype=data.draw(st.sampled_from(INDEX_DTYPES)),
        )
    kind = ""
    if broken == "v":
        choice = data.draw(st.integers(0, 1))
        if choice == 0:
            v, kind = data.draw(bad_tensors((b, k, d)))
        else:
            shape = data.draw(st.sampled_from([(b, k), (b, k, d, 1), (k,)]))
            v, kind = torch.rand(shape, dtype=dtype), f"shape {shape}"
    elif broken == "target":
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            target, kind = data.draw(st.sampled_from(NON_TENSORS[1:])), "non-tensor"
        elif choice == 1:
            bad = data.draw(st.sampled_from([k, -1, 100]))
            v = torch.rand(max(b, 1), k, d, dtype=dtype)
            target = torch.zeros(max(b, 1), dtype=torch.int64)
            target[-1] = bad
            kind = f"index {bad} for K={k}"
        elif choice == 2:
            dt = data.draw(st.sampled_from([torch.float32, torch.bool, torch.complex64]))
            target, kind = torch.zeros(b, dtype=dt), f"dtype {dt}"
        else:
            shape = data.draw(st.sampled_from([(b + 1,), (b, 1), ()]))
            target, kind = torch.zeros(shape, dtype=torch.int64), f"shape {shape}"
    out = _call("mask_capsules", lambda: mask_capsules(v, target), broken, kind)
    if out is RAISED:
        return
    assert out.shape == v.shape and out.dtype == v.dtype and _finite(out)
    kept = (out != 0).any(dim=-1).sum(dim=-1)
    assert bool((kept <= 1).all())  # at most one capsule per sample survives
    if target is not None and b:
        rows = torch.arange(b)
        assert torch.equal(out[rows, target.long()], v[rows, target.long()])


@given(st.data())
@counted
def test_fuzz_reconstruction_loss(data: st.DataObject) -> None:
    names = ["reconstruction", "target", "weight", "reduction"]
    broken = data.draw(st.sampled_from([None, None, *names]), label="broken")
    shape = data.draw(small_shape(min_rank=1, max_rank=4), label="shape")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    dtype2 = data.draw(st.sampled_from((dtype, *FLOAT_DTYPES)), label="target dtype")
    nonfinite = broken is None and data.draw(st.integers(0, 5)) == 0
    recon: Any = data.draw(real_tensors(shape, dtype, nonfinite=nonfinite), label="recon")
    target: Any = data.draw(real_tensors(shape, dtype2), label="target")
    if dtype2 == torch.float16 or dtype == torch.float16:  # keep the summed error representable
        recon, target = recon.clamp(-4, 4), target.clamp(-4, 4)
    weight: Any = data.draw(st.sampled_from([0.0005, 0.0, 1, 2.5]), label="weight")
    reduction: Any = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    kind = ""
    if broken in ("reconstruction", "target"):
        choice = data.draw(st.integers(0, 1))
        if choice == 0:
            bad, kind = data.draw(bad_tensors(shape))
        else:
            bad_shape = data.draw(st.sampled_from([(*shape, 1), (shape[0] + 1, *shape[1:])]))
            bad, kind = torch.rand(bad_shape), f"shape {bad_shape}"
            if broken == "reconstruction" and data.draw(st.booleans()):
                bad, kind = torch.tensor(0.5), "0-d"
                target = torch.tensor(0.5)
        if broken == "reconstruction":
            recon = bad
        else:
            target = bad
    elif broken == "weight":
        weight = data.draw(st.sampled_from([-1.0, -1e-9, *BAD_FLOATS]))
        kind = repr(weight)
    elif broken == "reduction":
        reduction = data.draw(st.sampled_from(["avg", None, 0]))
        kind = repr(reduction)
    out = _call(
        "reconstruction_loss",
        lambda: reconstruction_loss(recon, target, weight, reduction),
        broken,
        kind,
        nonfinite="reconstruction" if nonfinite else None,
    )
    if out is RAISED:
        return
    expected = (shape[0],) if reduction == "none" else ()
    assert tuple(out.shape) == expected
    assert out.dtype == torch.promote_types(
        torch.promote_types(recon.dtype, target.dtype), torch.float32
    )
    if not nonfinite and not (reduction == "mean" and shape[0] == 0):
        assert _finite(out) and bool((out >= 0).all())
    # the module computes the same
    loss = _call("ReconstructionLoss", lambda: ReconstructionLoss(weight, reduction), None)
    torch.testing.assert_close(loss(recon, target), out, equal_nan=True)


@given(st.data())
@counted
def test_fuzz_reconstruction_loss_module_options(data: st.DataObject) -> None:
    broken = data.draw(st.sampled_from(["weight", "reduction"]), label="broken")
    value = data.draw(
        st.sampled_from([-1.0, *BAD_FLOATS])
        if broken == "weight"
        else st.sampled_from(["avg", None, 0, "Mean"]),
        label="value",
    )
    _call("ReconstructionLoss", lambda: ReconstructionLoss(**{broken: value}), broken, repr(value))


# -- modules -------------------------------------------------------------------------------------
MODULE_DTYPES = (torch.float32, torch.float64)


@given(st.data())
@counted
def test_fuzz_conv2d_caps(data: st.DataObject) -> None:
    ctor = ["in_channels", "out_capsules", "capsule_dim", "kernel_size", "stride", "padding"]
    broken = data.draw(st.sampled_from([None, None, None, *ctor, "x", "x"]), label="broken")
    args: dict[str, Any] = {
        "in_channels": data.draw(st.integers(1, 6)),
        "out_capsules": data.draw(st.integers(1, 3)),
        "capsule_dim": data.draw(st.integers(1, 4)),
        "kernel_size": data.draw(st.one_of(st.integers(1, 3), positive_shape(2, 3))),
        "stride": data.draw(st.one_of(st.integers(1, 2), positive_shape(2, 2))),
        "padding": data.draw(
            st.one_of(st.integers(0, 1), st.tuples(st.integers(0, 1), st.integers(0, 1)))
        ),
    }
    mdtype = data.draw(st.sampled_from(MODULE_DTYPES), label="module dtype")
    kind = ""
    if broken in ctor:
        minimum = 0 if broken == "padding" else 1
        options: list[Any] = [minimum - 1, -7, 1.5, 2.0, True, None, "3"]
        if broken in ("kernel_size", "stride", "padding"):
            options += [(1, 2, 3), (1,), (), (minimum - 1, 1), (1, 1.5), [1, "1"]]
        bad = data.draw(st.sampled_from(options), label="bad")
        args[broken], kind = bad, repr(bad)
    layer = _call(
        "Conv2dCaps",
        lambda: Conv2dCaps(**args, dtype=mdtype),
        broken if broken in ctor else None,
        kind,
    )
    if layer is RAISED:
        return
    kh, kw = layer.kernel_size
    ph, pw = layer.padding
    b = data.draw(st.integers(0, 2), label="B")
    h = data.draw(st.integers(max(kh - 2 * ph, 1), 6), label="H")
    w = data.draw(st.integers(max(kw - 2 * pw, 1), 6), label="W")
    c = layer.in_channels
    grid = data.draw(st.booleans(), label="grid")
    if grid and c > 1 and c % 2 == 0:
        shape: tuple[int, ...] = (b, c // 2, h, w, 2)
    else:
        shape = (b, c, h, w)
    nonfinite = broken is None and data.draw(st.integers(0, 5)) == 0
    x: Any = data.draw(real_tensors(shape, mdtype, nonfinite=nonfinite), label="x")
    if broken == "x":
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            x, kind = data.draw(bad_tensors(shape))
        elif choice == 1:
            bad_shape = data.draw(
                st.sampled_from([(b, c + 1, h, w), (c, h, w), (b, c, h, w, 1, 1)])
            )
            x, kind = torch.rand(bad_shape, dtype=mdtype), f"shape {bad_shape}"
        elif choice == 2 and kh - 2 * ph - 1 >= 0:  # spatially smaller than the kernel
            x = torch.rand(b, c, kh - 2 * ph - 1, w, dtype=mdtype)
            kind = f"spatial {tuple(x.shape)} < kernel"
        elif choice == 2:
            x, kind = torch.rand(c, h, w, dtype=mdtype), "rank 3"
        else:  # a dtype other than the parameters'
            other = torch.float64 if mdtype == torch.float32 else torch.float32
            x = data.draw(real_tensors(shape, data.draw(st.sampled_from([other, torch.float16]))))
            kind = "dtype mismatch"
    out = _call(
        "Conv2dCaps",
        lambda: layer(x),
        "x" if broken == "x" else None,
        kind,
        nonfinite="x" if nonfinite else None,
    )
    if out is RAISED:
        return
    ho, wo = layer.output_size(h, w)
    assert out.shape == (b, layer.out_capsules, ho, wo, layer.capsule_dim)
    assert out.dtype == mdtype
    if not nonfinite:
        assert _finite(out)
        assert bool((torch.linalg.vector_norm(out.double(), dim=-1) <= 1 + 1e-6).all())


@given(st.data())
@counted
def test_fuzz_dynamic_routing(data: st.DataObject) -> None:
    ctor = ["iterations", "stop_gradient", "learned_prior", "eps"]
    broken = data.draw(st.sampled_from([None, None, None, *ctor, "u_hat", "u_hat"]), label="broken")
    b = data.draw(st.integers(0, 3), label="B")
    n_in = data.draw(st.integers(1, 6), label="N_in")
    n_out = data.draw(st.integers(1, 4), label="N_out")
    d = data.draw(st.integers(1, 4), label="D")
    kwargs: dict[str, Any] = {
        "iterations": data.draw(st.integers(1, 6)),
        "stop_gradient": data.draw(st.booleans()),
        "learned_prior": data.draw(st.sampled_from([None, (n_in, n_out), [n_in, n_out]])),
        "eps": data.draw(st.sampled_from([1e-12, 1e-6, 1e-3])),
    }
    kind = ""
    if broken == "iterations":
        kwargs[broken] = data.draw(st.sampled_from(BAD_INTS))
    elif broken == "stop_gradient":
        kwargs[broken] = data.draw(st.sampled_from([0, 1, "yes", None]))
    elif broken == "learned_prior":
        kwargs[broken] = data.draw(
            st.sampled_from([(n_in,), (n_in, n_out, 1), (0, n_out), (n_in, -1), (1.5, 2), 3, "ab"])
        )
    elif broken == "eps":
        kwargs[broken] = data.draw(st.sampled_from([0.0, -1.0, *BAD_FLOATS]))
    if broken in ctor:
        kind = repr(kwargs[broken])
    routing = _call(
        "DynamicRouting", lambda: DynamicRouting(**kwargs), broken if broken in ctor else None, kind
    )
    if routing is RAISED:
        return
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    nonfinite = broken is None and data.draw(st.integers(0, 5)) == 0
    u: Any = data.draw(real_tensors((b, n_in, n_out, d), dtype, nonfinite=nonfinite), label="u_hat")
    if broken == "u_hat":
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            u, kind = data.draw(bad_tensors((b, n_in, n_out, d)))
        elif choice == 1:
            shape = data.draw(
                st.sampled_from(
                    [
                        (b, n_in, n_out),
                        (b, 0, n_out, d),
                        (b, n_in, 0, d),
                        (b, n_in, n_out, 0),
                        (1, b, n_in, n_out, d),
                    ]
                )
            )
            u, kind = torch.rand(shape), f"shape {shape}"
        else:
            if routing.log_prior is None:
                u, kind = torch.rand(b, n_in, n_out), "rank 3"
            else:
                u, kind = torch.rand(b, n_in + 1, n_out, d), "N_in != learned_prior"
    grad = broken is None and not nonfinite and dtype in MODULE_DTYPES
    if grad:
        u = u.clone().requires_grad_(True)
    out = _call(
        "DynamicRouting",
        lambda: routing(u, return_coupling=True),
        "u_hat" if broken == "u_hat" else None,
        kind,
        nonfinite="u_hat" if nonfinite else None,
    )
    if out is RAISED:
        return
    v, c = out
    assert v.shape == (b, n_out, d) and c.shape == (b, n_in, n_out)
    assert v.dtype == dtype
    if not nonfinite:
        assert _finite(v) and _finite(c)
        assert bool((torch.linalg.vector_norm(v.double(), dim=-1) <= 1 + 1e-2).all())
        torch.testing.assert_close(
            c.double().sum(-1), torch.ones(b, n_in, dtype=torch.float64), atol=1e-2, rtol=0
        )
    if grad and v.numel():
        (g,) = torch.autograd.grad(v.sum(), u)
        assert _finite(g), "DynamicRouting: non-finite gradient for finite input"


@given(st.data())
@counted
def test_fuzz_dense_caps(data: st.DataObject) -> None:
    ctor = ["in_capsules", "in_dim", "out_capsules", "out_dim", "routing", "routing_kwargs"]
    broken = data.draw(st.sampled_from([None, None, None, *ctor, "x", "x"]), label="broken")
    args: dict[str, Any] = {
        "in_capsules": data.draw(st.integers(1, 8)),
        "in_dim": data.draw(st.integers(1, 4)),
        "out_capsules": data.draw(st.integers(1, 4)),
        "out_dim": data.draw(st.integers(1, 4)),
    }
    routing_choice = data.draw(st.integers(0, 2))
    if routing_choice == 0:
        args["routing"] = "dynamic"
        args["routing_kwargs"] = data.draw(st.sampled_from([None, {}, {"iterations": 2}]))
    elif routing_choice == 1:
        args["routing"] = data.draw(
            st.sampled_from(["Dynamic-Routing", "dynamic_routing", "DYNAMIC"])
        )
    else:
        args["routing"] = DynamicRouting(data.draw(st.integers(1, 4)))
    kind = ""
    if broken in ("in_capsules", "in_dim", "out_capsules", "out_dim"):
        args[broken] = data.draw(st.sampled_from(BAD_INTS))
    elif broken == "routing":
        args["routing"] = data.draw(st.sampled_from(["em", "", 3, None, torch.nn.ReLU()]))
        args.pop("routing_kwargs", None)
    elif broken == "routing_kwargs":
        if isinstance(args["routing"], Routing):
            args["routing_kwargs"] = {"iterations": 2}
        else:
            args["routing_kwargs"] = data.draw(
                st.sampled_from([[("iterations", 2)], "iterations=2", 3])
            )
    if broken in ctor:
        kind = repr(args[broken])
    mdtype = data.draw(st.sampled_from(MODULE_DTYPES), label="module dtype")
    layer = _call(
        "DenseCaps",
        lambda: DenseCaps(**args, dtype=mdtype),
        broken if broken in ctor else None,
        kind,
    )
    if layer is RAISED:
        return
    b = data.draw(st.integers(0, 3), label="B")
    n_in, d_in = layer.in_capsules, layer.in_dim
    middle = data.draw(st.sampled_from([(n_in,), (1, n_in), (n_in, 1)]), label="middle")
    shape = (b, *middle, d_in)
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    nonfinite = broken is None and data.draw(st.integers(0, 5)) == 0
    x: Any = data.draw(real_tensors(shape, dtype, nonfinite=nonfinite), label="x")
    if broken == "x":
        if data.draw(st.booleans()):
            x, kind = data.draw(bad_tensors(shape))
        else:
            bad_shape = data.draw(
                st.sampled_from([(b, n_in + 1, d_in), (b, n_in, d_in + 1), (n_in, d_in), (b,)])
            )
            x, kind = torch.rand(bad_shape), f"shape {bad_shape}"
    out = _call(
        "DenseCaps",
        lambda: layer(x, return_coupling=True),
        "x" if broken == "x" else None,
        kind,
        nonfinite="x" if nonfinite else None,
    )
    if out is RAISED:
        return
    v, c = out
    assert v.shape == (b, layer.out_capsules, layer.out_dim)
    assert c.shape == (b, n_in, layer.out_capsules)
    if not nonfinite:
        assert _finite(v) and _finite(c)


@given(st.data())
@counted
def test_fuzz_masked_decoder(data: st.DataObject) -> None:
    ctor = ["num_capsules", "capsule_dim", "out_shape", "hidden"]
    broken = data.draw(
        st.sampled_from([None, None, None, *ctor, "v", "target", "target"]), label="broken"
    )
    args: dict[str, Any] = {
        "num_capsules": data.draw(st.integers(1, 5)),
        "capsule_dim": data.draw(st.integers(1, 4)),
        "out_shape": data.draw(
            st.one_of(
                st.integers(1, 6), st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
            )
        ),
        "hidden": data.draw(st.lists(st.integers(1, 6), max_size=2).map(tuple)),
    }
    kind = ""
    if broken in ("num_capsules", "capsule_dim"):
        args[broken] = data.draw(st.sampled_from(BAD_INTS))
    elif broken == "out_shape":
        args[broken] = data.draw(
            st.sampled_from([0, -2, (), (2, 0), (2, -1), (1.5,), None, True, 2.0])
        )
    elif broken == "hidden":
        args[broken] = data.draw(st.sampled_from([(0,), (4, -1), (2.5,), 3, None]))
    if broken in ctor:
        kind = repr(args[broken])
    mdtype = data.draw(st.sampled_from(MODULE_DTYPES), label="module dtype")
    dec = _call(
        "MaskedDecoder",
        lambda: MaskedDecoder(**args, dtype=mdtype),
        broken if broken in ctor else None,
        kind,
    )
    if dec is RAISED:
        return
    b = data.draw(st.integers(0, 3), label="B")
    k, d = dec.num_capsules, dec.capsule_dim
    v: Any = data.draw(real_tensors((b, k, d), mdtype), label="v")
    target: Any = None
    if data.draw(st.booleans()):
        target = torch.tensor(
            data.draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)), dtype=torch.int64
        )
    if broken == "v":
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            v, kind = data.draw(bad_tensors((b, k, d)))
        elif choice == 1:
            bad_shape = data.draw(
                st.sampled_from([(b, k + 1, d), (b, k, d + 1), (b, k * d), (k, d)])
            )
            v, kind = torch.rand(bad_shape, dtype=mdtype), f"shape {bad_shape}"
        else:
            other = torch.float64 if mdtype == torch.float32 else torch.float32
            v, kind = (
                torch.rand(b, k, d, dtype=data.draw(st.sampled_from([other, torch.bfloat16]))),
                "dtype mismatch",
            )
    elif broken == "target":
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            bad = data.draw(st.sampled_from([k, k + 5, -1]))
            v = torch.rand(max(b, 1), k, d, dtype=mdtype)
            target = torch.zeros(max(b, 1), dtype=torch.int64)
            target[0] = bad
            kind = f"index {bad} for K={k}"
        elif choice == 1:
            dt = data.draw(st.sampled_from([torch.float32, torch.bool, torch.complex64]))
            target, kind = torch.zeros(b, dtype=dt), f"dtype {dt}"
        elif choice == 2:
            shape = data.draw(st.sampled_from([(b + 1,), (b, k), ()]))
            target, kind = torch.zeros(shape, dtype=torch.int64), f"shape {shape}"
        else:
            target, kind = data.draw(st.sampled_from(NON_TENSORS[1:])), "non-tensor"
    out = _call(
        "MaskedDecoder", lambda: dec(v, target), broken if broken in ("v", "target") else None, kind
    )
    if out is RAISED:
        return
    assert out.shape == (b, *dec.out_shape) and out.dtype == mdtype
    assert _finite(out) and bool(((out >= 0) & (out <= 1)).all())


@given(st.data())
@counted
def test_fuzz_resolve_routing(data: st.DataObject) -> None:
    broken = data.draw(
        st.sampled_from([None, None, "routing", "routing_kwargs", "iterations"]), label="broken"
    )
    routing: Any = data.draw(
        st.sampled_from(
            [
                "dynamic",
                "Dynamic",
                "DynamicRouting",
                "dynamic-routing",
                "dynamic_routing",
                "DYNAMIC ROUTING",
            ]
        )
    )
    kwargs: dict[str, Any] = data.draw(
        st.sampled_from([{}, {"iterations": 2}, {"stop_gradient": True}])
    )
    kind = ""
    if broken == "routing":
        routing = data.draw(st.sampled_from(["em", "dyn", "", "routing", 1, None, DynamicRouting]))
        kind = repr(routing)
    elif broken == "routing_kwargs":  # kwargs with an instance
        routing, kwargs, kind = DynamicRouting(), {"iterations": 2}, "kwargs with an instance"
    elif broken == "iterations":
        kwargs = {"iterations": data.draw(st.sampled_from(BAD_INTS))}
        kind = repr(kwargs)
    out = _call("resolve_routing", lambda: resolve_routing(routing, **kwargs), broken, kind)
    if out is RAISED:
        return
    assert isinstance(out, DynamicRouting)
    for key, value in kwargs.items():
        assert getattr(out, key) == value


# -- former gaps found by fuzzing, kept as regression tests ---------------------------------------
# Some are edge cases the strategies above do not draw (K = 0, zero spatial size, eps below
# float32's smallest normal number).


@pytest.mark.parametrize(
    "fn, arg", [(squash, "s"), (capsule_lengths, "v")], ids=["squash", "lengths"]
)
def test_gap_zero_dim_message_names_argument(fn: Callable[..., Any], arg: str) -> None:
    with pytest.raises(ValueError) as info:
        fn(torch.tensor(1.0))
    assert _names(str(info.value), arg), str(info.value)


@pytest.mark.parametrize("shape", [(3, 5, 5), (1, 2, 5, 5, 2)], ids=["rank3", "grid"])
def test_gap_conv2d_caps_shape_message_names_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError) as info:
        Conv2dCaps(3, 2, 4, kernel_size=3)(torch.rand(shape))
    assert _names(str(info.value), "x"), str(info.value)


@pytest.mark.parametrize("which", ["Conv2dCaps", "MaskedDecoder"])
def test_gap_dtype_mismatch_is_a_type_error(which: str) -> None:
    with pytest.raises(TypeError, match="input|v"):
        if which == "Conv2dCaps":
            Conv2dCaps(3, 2, 4, kernel_size=3)(torch.rand(1, 3, 5, 5, dtype=torch.float64))
        else:
            MaskedDecoder(3, 4, 6)(torch.rand(2, 3, 4, dtype=torch.float64))


def test_gap_dense_caps_non_tensor_input() -> None:
    with pytest.raises(TypeError, match="input"):
        DenseCaps(4, 3, 2, 2)([[0.0] * 3] * 4)


def test_gap_mask_capsules_without_capsules() -> None:
    with pytest.raises(ValueError, match="v"):
        mask_capsules(torch.rand(2, 0, 3))


def test_gap_margin_loss_without_classes() -> None:
    with pytest.raises(ValueError, match="lengths"):
        margin_loss(torch.rand(0, 0), torch.zeros(0, dtype=torch.long))


def test_gap_conv2d_caps_zero_spatial_size() -> None:
    with pytest.raises(ValueError, match="input"):
        Conv2dCaps(1, 1, 2, kernel_size=1, padding=1)(torch.rand(1, 1, 0, 3))


def test_gap_tiny_eps_keeps_gradient_finite() -> None:
    s = torch.zeros(2, 4, requires_grad=True)
    (g,) = torch.autograd.grad(squash(s, eps=1e-50).sum(), s)
    assert _finite(g)


# -- the count: keep this the last test of the file ----------------------------------------------
def test_fuzz_case_count(request: pytest.FixtureRequest) -> None:
    """Every fuzz test selected in this session ran examples; print the totals (``-s``)."""
    selected = {
        item.name
        for item in request.session.items
        if item.name.startswith("test_fuzz_") and item.name != "test_fuzz_case_count"
    }
    if not selected:
        pytest.skip("no fuzz test selected in this session")
    missing = sorted(name for name in selected if EXAMPLES[name] == 0)
    assert not missing, f"fuzz tests that ran no example: {missing}"
    if selected >= {name for name in globals() if name.startswith("test_fuzz_")} - {
        "test_fuzz_case_count"
    }:
        assert {t for t in FUZZ_TARGETS if CASES[t] == 0} == set(), CASES
    print("\n" + _summary())
