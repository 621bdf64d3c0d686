"""examples/engine.py: the training step, the learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

import engine
import presets
from torchcaps.models import CapsNet


def _context(model: CapsNet, scheduler: bool = True) -> engine.StepContext:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return engine.StepContext(
        model=model,
        loss_fn=presets.CapsuleLoss(),
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        scheduler=engine.make_scheduler(optimizer, "cosine", total_steps=4) if scheduler else None,
        amp="none",
        device=torch.device("cpu"),
    )


@pytest.mark.usefixtures("one_thread")
def test_train_step_updates_the_parameters_and_returns_the_detached_loss() -> None:
    model = CapsNet(conv_channels=8, primary_capsules=2, decoder_hidden=(32, 64))
    ctx = _context(model)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 5, 9])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected, _ = engine.forward_loss(ctx, x, y, train=True)
    loss = engine.train_step(ctx, x, y)
    assert loss.dim() == 0 and not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, expected)  # the loss of the batch before the update
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == set(before)  # every parameter moved (Adam's first step)
    assert ctx.scheduler is not None and ctx.scheduler.last_epoch == 1  # stepped per batch
    assert ctx.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-3 * engine.cosine_factor(1, 4, 0.01)
    )
    # a second step from the updated parameters gives another loss
    assert not torch.equal(engine.train_step(ctx, x, y), loss)


def test_forward_loss_masks_the_decoder_by_the_labels_only_in_training() -> None:
    torch.manual_seed(0)
    model = CapsNet(
        (1, 12, 12),
        3,
        conv_channels=4,
        conv_kernel=5,
        primary_capsules=2,
        primary_kernel=3,
        decoder_hidden=(8,),
    )
    with torch.no_grad():
        model.digits.weight.normal_(0, 0.5)
    ctx = _context(model, scheduler=False)
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        predicted = model(x).scores.argmax(dim=1)
        wrong = (predicted + 1) % 3
        _, train_out = engine.forward_loss(ctx, x, wrong, train=True)
        _, eval_out = engine.forward_loss(ctx, x, wrong, train=False)
    torch.testing.assert_close(train_out.reconstruction, model(x, wrong).reconstruction)
    torch.testing.assert_close(eval_out.reconstruction, model(x, predicted).reconstruction)
    assert not torch.allclose(train_out.reconstruction, eval_out.reconstruction)


def test_cosine_factor_values() -> None:
    assert engine.cosine_factor(0, 100, 0.01) == 1.0
    assert engine.cosine_factor(50, 100, 0.01) == pytest.approx(0.505)
    assert engine.cosine_factor(25, 100, 0.0) == pytest.approx((1 + 2**-0.5) / 2)
    assert engine.cosine_factor(100, 100, 0.01) == pytest.approx(0.01)
    assert engine.cosine_factor(150, 100, 0.01) == pytest.approx(0.01)  # held after the end
    steps = [engine.cosine_factor(t, 40, 0.1) for t in range(41)]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # strictly decreasing


def test_make_scheduler() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    exp = engine.make_scheduler(opt, "exponential", total_steps=10, lr_decay=0.5)
    assert isinstance(exp, torch.optim.lr_scheduler.ExponentialLR)
    opt.step()
    exp.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    opt = torch.optim.SGD([w], lr=1.0)
    cos = engine.make_scheduler(opt, "cosine", total_steps=10, lr_min_factor=0.2)
    for _ in range(10):
        opt.step()
        cos.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_exponential_schedule_with_a_floor() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=5e-4)
    sched = engine.make_scheduler(opt, "exponential", total_steps=10, lr_decay=0.97, lr_floor=5e-5)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for epoch, lr in enumerate(seen):  # 5e-4 x 0.97^epoch until it reaches 5e-5 (epoch 76)
        assert lr == pytest.approx(max(5e-4 * 0.97**epoch, 5e-5))
    assert seen[75] > 5e-5 and seen[76] == pytest.approx(5e-5)


def test_train_batches_shard_each_global_batch() -> None:
    whole = list(engine.train_batches(10, 4, torch.Generator().manual_seed(3)))
    assert [len(b) for b in whole] == [4, 4]  # the partial last batch is dropped
    for rank in range(2):
        shards = list(engine.train_batches(10, 4, torch.Generator().manual_seed(3), rank, 2))
        for shard, batch in zip(shards, whole, strict=True):
            assert torch.equal(shard, batch[rank * 2 : (rank + 1) * 2])


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_precision_summary_says_what_runs_in_which_precision(
    monkeypatch: pytest.MonkeyPatch, bf16_instructions: bool
) -> None:
    import torchcaps.layers._tap_matmul as tap_matmul
    from torchcaps.models import get_model

    monkeypatch.setattr(tap_matmul, "cpu_has_bf16_instructions", lambda: bf16_instructions)
    model = get_model("capsnet_mnist")
    cpu = torch.device("cpu")
    assert engine.precision_summary(model, "none", cpu) == "precision: float32 throughout"
    said = engine.precision_summary(model, "bf16", cpu)
    assert said.startswith("precision: --amp bf16: convolutions and linear layers in bf16")
    assert said.endswith("routing, squash and losses in float32")
    wide = "wide Conv2dCaps as bfloat16 tap products with float32 sums"
    assert (wide in said) == bf16_instructions
    assert ("wide Conv2dCaps in float32" in said) == (not bf16_instructions)
    compiled = engine.precision_summary(model, "bf16", cpu, compiled=True)
    assert "wide Conv2dCaps as torch's convolution in bf16 (compiled)" in compiled
    native = get_model("capsnet_mnist", conv_impl="native")
    assert "Conv2dCaps" not in engine.precision_summary(native, "bf16", cpu)
    # A model without a wide convolution (Efficient-CapsNet's is depthwise) says nothing of it.
    assert "Conv2dCaps" not in engine.precision_summary(
        get_model("efficient_capsnet_mnist"), "bf16", cpu
    )


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_bf16_falls_back_to_float32_where_it_would_be_emulated(
    monkeypatch: pytest.MonkeyPatch, bf16_instructions: bool
) -> None:
    import mnist_capsnet
    import torchcaps.layers._tap_matmul as tap_matmul

    monkeypatch.setattr(tap_matmul, "cpu_has_bf16_instructions", lambda: bf16_instructions)
    cpu = torch.device("cpu")
    expected = "bf16" if bf16_instructions else "none"
    assert engine.effective_amp("bf16", cpu) == expected
    assert engine.effective_amp("none", cpu) == "none"
    argv = ["--embedded-sample", "--quiet", "--amp", "bf16", "--max-train-samples", "64"]
    argv += ["--batch-size", "16", "--max-test-samples", "32"]
    trainer = engine.Trainer(
        mnist_capsnet.parse_args(argv), mnist_capsnet.RECIPE, log=lambda *a, **k: None
    )
    assert trainer.amp == trainer.step_context.amp == expected
    said = engine.precision_summary(trainer.model, trainer.amp, cpu, requested="bf16")
    assert ("asked for, but this CPU has no bf16 instructions" in said) == (not bf16_instructions)


def test_per_dataset_builds_once_per_source_tensors() -> None:
    calls: list[tuple[int, int]] = []

    def build(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append((images.shape[0], labels.shape[0]))
        return images * 2

    made = engine.PerDataset(build)
    a, a_labels = torch.arange(3.0), torch.arange(3)
    first = made(a, a_labels)
    assert made(a, a_labels) is first
    assert calls == [(3, 3)]
    b = a.clone()  # equal values, another tensor: built again
    assert made(b, a_labels) is not first
    torch.testing.assert_close(made(b, a_labels), a * 2)
    assert calls == [(3, 3), (3, 3)]
