"""torchcaps.routing.em: EMRouting against a float64 reference written from Procedure 1 of
Hinton et al. (2018) with explicit loops, the degenerate cases, gradients, precision, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from reference import em_routing_ref
from torchcaps import EMRouting, ShapeError
from torchcaps.routing import matrix_routing_choices, resolve_matrix_routing
from torchcaps.testing import assert_matrix_routing_contract


def _inputs(
    shape: tuple[int, int, int, int], seed: int, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    acts = torch.rand(shape[:2], generator=g, dtype=torch.float64)
    return votes, acts


def _routing(n_out: int, iterations: int, seed: int = 0, **kwargs: object) -> EMRouting:
    """A routing with non-zero (random) beta_u, beta_a."""
    routing = EMRouting(n_out, iterations, dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        routing.beta_u.copy_(0.5 * torch.randn(n_out, generator=g, dtype=torch.float64))
        routing.beta_a.copy_(3.0 * torch.randn(n_out, generator=g, dtype=torch.float64))
    return routing


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (1, 1, 2, 16), (2, 9, 5, 3)])
@pytest.mark.parametrize(("mass_scale", "beta_a_scale"), [(100.0, 1.0), (None, 1.0), (100.0, 20.0)])
def test_matches_procedure_1_reference(
    iterations: int,
    shape: tuple[int, int, int, int],
    mass_scale: float | None,
    beta_a_scale: float,
) -> None:
    votes, acts = _inputs(shape, seed=iterations + sum(shape))
    routing = _routing(
        shape[2], iterations, final_lambda=0.05, mass_scale=mass_scale, beta_a_scale=beta_a_scale
    )
    expected = em_routing_ref(
        votes,
        acts,
        routing.beta_u.detach(),
        routing.beta_a.detach(),
        iterations,
        final_lambda=0.05,
        mass_scale=mass_scale,
        beta_a_scale=beta_a_scale,
    )
    got = routing(votes, acts, return_coupling=True)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-7)


def test_one_iteration_is_the_activation_weighted_mean_of_uniform_assignments() -> None:
    votes, acts = _inputs((3, 8, 4, 16), seed=2)
    poses, a, r = EMRouting(4, iterations=1, dtype=torch.float64)(votes, acts, True)
    assert bool((r == 0.25).all())
    expected = (acts[:, :, None, None] * votes).sum(dim=1) / acts.sum(dim=1)[:, None, None]
    torch.testing.assert_close(poses, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("beta_a_scale", [1.0, 5000.0])
def test_a_parent_without_mass_has_the_activation_its_bias_sets(beta_a_scale: float) -> None:
    """All children inactive: the cost is 0, so a_j = sigmoid(lambda_T * s * beta_a_j)."""
    votes, _ = _inputs((2, 6, 3, 16), seed=4)
    routing = _routing(3, iterations=3, beta_a_scale=beta_a_scale)
    _, a = routing(votes, torch.zeros(2, 6, dtype=torch.float64))
    logit = routing.inverse_temperature(3) * beta_a_scale * routing.beta_a.detach()
    torch.testing.assert_close(a, torch.sigmoid(logit).expand(2, 3))


def test_poses_are_the_r_a_weighted_means_of_the_votes() -> None:
    """The returned R is the one the last M-step used."""
    votes, acts = _inputs((2, 10, 3, 16), seed=3)
    poses, _, r = _routing(3, iterations=3)(votes, acts, True)
    w = r * acts.unsqueeze(2)
    expected = torch.einsum("bij,bijh->bjh", w, votes) / w.sum(dim=1).unsqueeze(2)
    torch.testing.assert_close(poses, expected)


def test_the_inverse_temperature_schedule() -> None:
    routing = EMRouting(3, final_lambda=0.02)
    assert [routing.inverse_temperature(t) for t in (1, 2, 3)] == pytest.approx(
        [0.02 * 0.05, 0.02 * (1 - 0.95**2), 0.02 * (1 - 0.95**3)]
    )


def test_log_normalize_hook_replaces_the_e_step_normalisation() -> None:
    votes, acts = _inputs((2, 6, 3, 4), seed=4)
    routing = _routing(3, iterations=3)
    default = routing.route(votes, acts)
    same = routing.route(votes, acts, log_normalize=lambda x: torch.log_softmax(x, dim=2))
    for a, b in zip(default, same, strict=True):
        torch.testing.assert_close(a, b)
    # a normalisation that halves every child's total assignment is applied as given
    half = routing.route(
        votes,
        acts,
        log_normalize=lambda x: torch.log_softmax(x, dim=2) + torch.log(torch.tensor(0.5)),
    )
    torch.testing.assert_close(half[2].sum(dim=2), torch.full((2, 6), 0.5, dtype=torch.float64))


def _finite_everywhere(routing: EMRouting, votes: torch.Tensor, acts: torch.Tensor) -> None:
    votes = votes.clone().requires_grad_(True)
    acts = acts.clone().requires_grad_(True)
    poses, a, r = routing(votes, acts, return_coupling=True)
    for t in (poses, a, r):
        assert bool(torch.isfinite(t).all())
    assert bool(((a >= 0) & (a <= 1)).all())
    gv, ga = torch.autograd.grad(poses.square().sum() + a.sum(), (votes, acts))
    assert bool(torch.isfinite(gv).all()) and bool(torch.isfinite(ga).all())


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs_stay_finite(iterations: int, dtype: torch.dtype) -> None:
    routing = EMRouting(3, iterations, dtype=dtype)
    votes, acts = _inputs((2, 5, 3, 16), seed=5)
    votes, acts = votes.to(dtype), acts.to(dtype)
    identical = votes[:, :1].expand(-1, 5, -1, -1).contiguous()  # zero variance
    cases = {
        "identical votes": (identical, acts),
        "a single child": (votes[:, :1], acts[:, :1]),
        "all-zero activations": (votes, torch.zeros_like(acts)),
        "all-one activations": (votes, torch.ones_like(acts)),
        "votes of magnitude 1e4": (votes * 1e4, acts),
    }
    for what, (v, a) in cases.items():
        try:
            _finite_everywhere(routing, v, a)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from exc


def test_no_mass_gives_the_unweighted_mean_of_the_votes() -> None:
    votes, acts = _inputs((1, 4, 2, 16), seed=6)
    poses, _ = EMRouting(2, iterations=2, dtype=torch.float64)(votes, torch.zeros_like(acts))
    torch.testing.assert_close(poses, votes.mean(dim=1))


def test_bfloat16_autocast_routes_in_float32() -> None:
    votes, acts = _inputs((2, 9, 4, 16), seed=7)
    routing = EMRouting(4)
    expected = routing(votes.float(), acts.float(), return_coupling=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = routing(votes.bfloat16(), acts.bfloat16(), return_coupling=True)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32  # float32 compute returns float32 under autocast
        torch.testing.assert_close(g, e, atol=0.05, rtol=0.05)  # only the bf16 rounding of inputs
    plain = routing(votes.bfloat16(), acts.bfloat16())
    assert all(t.dtype == torch.bfloat16 for t in plain)


def test_gradcheck() -> None:
    votes, acts = _inputs((2, 4, 3, 3), seed=8)
    routing = _routing(3, iterations=3, final_lambda=0.5, eps=0.1, beta_a_scale=2.0)
    votes.requires_grad_(True)
    acts.requires_grad_(True)
    assert gradcheck(lambda v, a: routing(v, a), (votes, acts), eps=1e-6, atol=1e-5)
    # and into the learned beta_u, beta_a

    def fn(bu: torch.Tensor, ba: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.func.functional_call(routing, {"beta_u": bu, "beta_a": ba}, (votes, acts))

    bu = routing.beta_u.detach().clone().requires_grad_(True)
    ba = routing.beta_a.detach().clone().requires_grad_(True)
    assert gradcheck(fn, (bu, ba), eps=1e-6, atol=1e-5)


def _values_and_grads(
    routing: EMRouting, votes: torch.Tensor, acts: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    """Outputs and the gradients of a random linear function of them (every output used)."""
    votes = votes.detach().requires_grad_(True)
    acts = acts.detach().requires_grad_(True)
    out = routing(votes, acts, return_coupling=True)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
    params = (votes, acts, routing.beta_u, routing.beta_a)
    return [*out, *torch.autograd.grad(loss, params)]


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 7),
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 4),
    st.sampled_from(["random", "zero", "one", "some zero"]),
    st.integers(0, 2**16),
)
def test_the_graph_free_backward_equals_autograd_through_the_plain_passes(
    batch: int, n_in: int, n_out: int, pose: int, iterations: int, acts_kind: str, seed: int
) -> None:
    """Training runs EM as one autograd Function (no graph kept over the votes, a hand-written
    assembly of their gradient); compiled code traces the same iterations as plain operations.
    Both must give the same values and gradients, degenerate activations included."""
    votes, acts = _inputs((batch, n_in, n_out, pose), seed=seed, scale=2.0)
    acts = {
        "random": acts,
        "zero": torch.zeros_like(acts),  # no parent has mass: poses are the votes' centre
        "one": torch.ones_like(acts),
        "some zero": torch.where(acts < 0.5, torch.zeros_like(acts), acts),
    }[acts_kind]
    routing = _routing(n_out, iterations, seed=seed, final_lambda=0.3)
    fast = _values_and_grads(routing, votes, acts, seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        plain = _values_and_grads(routing, votes, acts, seed)
    for f, p in zip(fast, plain, strict=True):
        torch.testing.assert_close(f, p, atol=1e-10, rtol=1e-8)


def test_a_retained_graph_gives_the_same_gradients_twice() -> None:
    """The backward forms the votes' gradient in a saved buffer only when the graph is not
    retained; with ``retain_graph=True`` a second backward sees the same buffers."""
    votes, acts = _inputs((2, 7, 3, 16), seed=10)
    votes.requires_grad_(True)
    routing = _routing(3, iterations=3)
    poses, a = routing(votes, acts)
    loss = (poses * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum() + a.sum()
    (first,) = torch.autograd.grad(loss, votes, retain_graph=True)
    (second,) = torch.autograd.grad(loss, votes, retain_graph=True)
    (third,) = torch.autograd.grad(loss, votes)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, third, rtol=0, atol=0)


def test_training_steps_leave_no_tensor_behind() -> None:
    """Nothing of EM's backward (the stacked votes, the replayed graph) stays alive after it:
    a reference cycle there would leak a few votes-sized tensors per training step."""
    import gc

    routing = _routing(3, iterations=3)

    def step() -> None:
        votes, acts = _inputs((2, 9, 3, 16), seed=9)
        votes.requires_grad_(True)
        poses, a, r = routing(votes, acts, return_coupling=True)
        (poses.sum() + a.sum() + r.sum()).backward()

    def live_tensors() -> int:
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    step()
    before = live_tensors()
    for _ in range(3):
        step()
    # not more (other tests' garbage may still go away: fewer is fine); a cycle would keep
    # dozens of tensors per step
    assert live_tensors() <= before


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.integers(1, 4)
)
def test_contract_over_shapes_and_iterations(
    batch: int, n_in: int, n_out: int, pose: int, iterations: int
) -> None:
    assert_matrix_routing_contract(
        EMRouting(n_out, iterations, dtype=torch.float64),
        batch=batch,
        in_capsules=n_in,
        out_capsules=n_out,
        pose_dim=pose,
    )


def test_resolves_by_name() -> None:
    assert matrix_routing_choices() == ["em"]
    for name in ("em", "EM", "EMRouting", "em_routing"):
        r = resolve_matrix_routing(name, out_capsules=3, iterations=2)
        assert isinstance(r, EMRouting) and (r.out_capsules, r.iterations) == (3, 2)
    with pytest.raises(
        ValueError, match="could not resolve routing 'dynamic'; choices: \\['em'\\]"
    ):
        resolve_matrix_routing("dynamic")
    r = EMRouting(2)
    assert resolve_matrix_routing(r) is r


def test_bad_arguments() -> None:
    for kwargs, match in (
        ({"out_capsules": 0}, "out_capsules"),
        ({"out_capsules": 2, "iterations": 0}, "iterations"),
        ({"out_capsules": 2, "final_lambda": 0.0}, "final_lambda"),
        ({"out_capsules": 2, "final_lambda": float("nan")}, "final_lambda"),
        ({"out_capsules": 2, "eps": 0.0}, "eps"),
        ({"out_capsules": 2, "mass_scale": -1.0}, "mass_scale"),
        ({"out_capsules": 2, "beta_a_scale": 0.0}, "beta_a_scale"),
    ):
        with pytest.raises(ValueError, match=match):
            EMRouting(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterations"):
        EMRouting(2, iterations=1.5)  # type: ignore[arg-type]
    routing = EMRouting(3)
    votes, acts = torch.randn(2, 5, 3, 16), torch.rand(2, 5)
    with pytest.raises(ShapeError, match=r"votes of shape \(B, N_in, 3, P\).*got \(2, 5, 4, 16\)"):
        routing(torch.randn(2, 5, 4, 16), acts)
    with pytest.raises(ShapeError, match=r"activations of shape \(2, 5\), got \(2, 4\)"):
        routing(votes, acts[:, :4])
    with pytest.raises(ShapeError, match="votes"):
        routing(votes[..., 0], acts)
    with pytest.raises(TypeError, match="votes must be a real floating-point tensor"):
        routing(votes.long(), acts)
    with pytest.raises(TypeError, match="activations must be a torch.Tensor"):
        routing(votes, [0.5] * 5)  # type: ignore[arg-type]
