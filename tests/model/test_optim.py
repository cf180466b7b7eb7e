"""chatlm.model.optim: every optimizer steps on CPU; legacy Adafactor ignores lr; schedule values."""

from __future__ import annotations

import math

import pytest
import torch

from chatlm.model.optim import build_optimizer, build_scheduler, legacy_onecycle_total_steps

# bitsandbytes warns that paging needs CUDA; on CPU the paged optimizer runs unpaged.
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

OPTIMIZERS = ["adafactor_legacy", "adafactor", "adamw", "adamw8bit", "paged_adamw8bit"]


def toy(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A linear regression big enough (64x64 = 4096 weights) for bitsandbytes' 8-bit state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 64, generator=g)
    y = x @ torch.randn(64, 64, generator=g)
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 64), x, y


def train(name: str, lr: float, steps: int = 30, scheduler: str | None = None):
    model, x, y = toy()
    opt = build_optimizer(name, model.parameters(), lr=lr)
    sched = build_scheduler(scheduler, opt, total_steps=steps, lr=lr) if scheduler else None
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return model, opt, losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_reduces_loss_on_cpu(name):
    _, opt, losses = train(name, lr=1e-2)
    assert losses[-1] < 0.97 * losses[0], losses  # adafactor_legacy steps ~1e-3 * RMS: slow
    assert all(math.isfinite(v) for v in losses)
    if "8bit" in name:
        state = opt.state[opt.param_groups[0]["params"][0]]
        assert state["state1"].dtype == torch.uint8  # really 8-bit moments


def test_adafactor_legacy_ignores_lr():
    a, opt, _ = train("adafactor_legacy", lr=1e-4)
    b, _, _ = train("adafactor_legacy", lr=5.0)
    c, _, _ = train("adafactor_legacy", lr=1e-4, scheduler="onecycle")  # legacy: schedule too
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and torch.equal(pa, pc)
    group = opt.param_groups[0]
    assert group["lr"] is None and group["relative_step"] and group["scale_parameter"]
    assert not group["warmup_init"] and group["clip_threshold"] == 1.0
    assert group["decay_rate"] == -0.8 and group["beta1"] is None and group["eps"] == (1e-30, 1e-3)
    assert group["weight_decay"] == 0.0


def test_adafactor_legacy_step_size():
    """Relative step: the first update is max(1e-3, RMS(p)) * min(1e-2, 1/sqrt(1)) scaled."""
    p = torch.nn.Parameter(torch.full((4, 4), 2.0))
    opt = build_optimizer("adafactor_legacy", [p], lr=123.0)
    p.grad = torch.ones_like(p)
    opt.step()
    # RMS(p) = 2, relative step 1e-2; a unit gradient normalises to an update of RMS 1.
    torch.testing.assert_close(p.detach(), torch.full((4, 4), 2.0 - 2.0 * 1e-2))


def test_adafactor_is_the_hf_trainer_one(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), optim="adafactor", learning_rate=3e-4,
                             report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    model, _, _ = toy()
    theirs = cls(model.parameters(), **kwargs)
    ours = build_optimizer("adafactor", model.parameters(), lr=3e-4)
    assert type(ours) is cls
    assert ours.defaults == theirs.defaults
    assert ours.defaults["lr"] == 3e-4 and not ours.defaults["relative_step"]


def test_adamw_hyperparameters():
    model, _, _ = toy()
    opt = build_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=0.1,
                          betas=(0.8, 0.95), eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6
    assert opt.defaults["weight_decay"] == 0.1


def test_unknown_names():
    model, _, _ = toy()
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'.*adamw"):
        build_optimizer("sgd", model.parameters(), lr=1.0)  # type: ignore[arg-type]
    opt = build_optimizer("adamw", model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="unknown scheduler 'poly'.*onecycle"):
        build_scheduler("poly", opt, total_steps=10)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- schedules
def lrs(sched, opt, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_onecycle_is_the_legacy_schedule():
    lr, div, epochs, per_epoch = 5e-5, 25.0, 3, 10
    model, _, _ = toy()
    opt = build_optimizer("adamw", model.parameters(), lr=lr)
    ours = lrs(build_scheduler("onecycle", opt, total_steps=epochs * per_epoch, lr=lr,
                               div_factor=div), opt, epochs * per_epoch)
    model, _, _ = toy()
    ref_opt = torch.optim.AdamW(model.parameters(), lr=lr)
    legacy = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=div * lr, epochs=epochs,
                                                 steps_per_epoch=per_epoch, div_factor=div,
                                                 cycle_momentum=False)
    assert ours == lrs(legacy, ref_opt, epochs * per_epoch)
    assert ours[0] == pytest.approx(lr, rel=1e-12)
    assert max(ours) == pytest.approx(div * lr, rel=1e-12)
    assert ours.index(max(ours)) == round(0.3 * 30) - 1  # pct_start 0.3
    assert ours[-1] < lr / 100


def test_onecycle_on_adafactor_legacy():
    """lr None in the param group: OneCycleLR writes lrs (logged), the updates ignore them."""
    model, _, _ = toy()
    opt = build_optimizer("adafactor_legacy", model.parameters(), lr=1e-4)
    values = lrs(build_scheduler("onecycle", opt, total_steps=10, lr=1e-4, div_factor=50), opt, 10)
    assert values[0] == pytest.approx(1e-4) and max(values) == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="needs lr"):
        build_scheduler("onecycle", build_optimizer("adafactor_legacy", model.parameters(), lr=1.0),
                        total_steps=10)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_warmup_schedules(name):
    lr, warmup, total = 1e-3, 4, 20
    model, _, _ = toy()
    opt = build_optimizer("adamw", model.parameters(), lr=lr)
    values = lrs(build_scheduler(name, opt, total_steps=total, warmup_steps=warmup), opt, total)
    assert values[:warmup + 1] == pytest.approx([lr * s / warmup for s in range(warmup + 1)])
    progress = [(s - warmup) / (total - warmup) for s in range(warmup, total)]
    expected = {
        "cosine": [lr * 0.5 * (1 + math.cos(math.pi * p)) for p in progress],
        "linear": [lr * (1 - p) for p in progress],
        "constant": [lr for _ in progress],
    }[name]
    assert values[warmup:] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_lambda_schedules_skip_adafactor_legacy(name):
    model, _, _ = toy()
    opt = build_optimizer("adafactor_legacy", model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="skipped"):
        assert build_scheduler(name, opt, total_steps=10) is None


def test_schedule_argument_errors():
    model, _, _ = toy()
    opt = build_optimizer("adamw", model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler("cosine", opt, total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler("cosine", opt, total_steps=5, warmup_steps=-1)


def test_legacy_onecycle_total_steps():
    assert legacy_onecycle_total_steps(1000, 20, 6, 20) == 20 * math.ceil(1000 / 120)
    assert legacy_onecycle_total_steps(120, 20, 6, 1) == 1
    assert legacy_onecycle_total_steps(121, 20, 6, 2) == 4
    with pytest.raises(ValueError):
        legacy_onecycle_total_steps(0, 20, 6, 2)


@pytest.mark.parametrize("kwargs", [
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=False),   # adafactor_legacy
    dict(lr=1e-3, relative_step=False, scale_parameter=False),                    # adafactor (HF Trainer)
    dict(lr=1e-3, relative_step=False, scale_parameter=True, beta1=0.9, weight_decay=0.01),
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True),
])
def test_lean_adafactor_follows_transformers_adafactor(kwargs):
    """The main path's Adafactor: Transformers' update rule with fewer passes, equal to float rounding."""
    from transformers.optimization import Adafactor

    from chatlm.model.adafactor import LeanAdafactor, lean_optimizer

    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (3, 16, 24), (200, 8)]
    start = [torch.randn(*s) for s in shapes]
    ref = [p.clone().requires_grad_() for p in start]
    lean = [p.clone().requires_grad_() for p in start]
    opt_ref = Adafactor(ref, **kwargs)
    opt_lean = lean_optimizer(Adafactor(lean, **kwargs))
    assert isinstance(opt_lean, LeanAdafactor)
    for step in range(20):
        grads = [torch.randn(*s) * (0.1 + step) for s in shapes]
        for a, b, g in zip(ref, lean, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_lean.step()
    for a, b, p0 in zip(ref, lean, start):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        assert not torch.equal(a.detach(), p0)  # it trained
    # the same state keys: checkpoints move between the two classes
    assert {k for s in opt_ref.state.values() for k in s} == {k for s in opt_lean.state.values() for k in s}
