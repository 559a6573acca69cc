"""TorchEngine against hand-written AdamW, accumulation, schedule and EMA closed forms (one process)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from engine_cases import OPTIM, loss_fn, make_data, make_model, train_steps, trainable
from torch import nn

from psr.engine import STATE_FORMAT, Engine, TorchEngine, build_engine, lr_at


def _engine(model: nn.Module, **kw) -> TorchEngine:
    engine = TorchEngine(**{k: kw.pop(k) for k in ("precision", "ema_decay") if k in kw})
    engine.setup(model, trainable(model), **{**OPTIM, **kw})
    return engine


def test_engine_satisfies_protocol() -> None:
    assert isinstance(_engine(make_model()), Engine)


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_two_steps_equal_handwritten_adamw(grad_clip: float | None) -> None:
    """AdamW with bias correction, decoupled weight decay and global-norm clipping, in float64."""
    lr, (b1, b2), wd, eps = 0.1, (0.9, 0.99), 0.05, 1e-8
    model = make_model()
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = _engine(model, lr=lr, schedule="constant", warmup_steps=0, grad_clip=grad_clip)
    x, y = make_data()
    m = {n: torch.zeros_like(v) for n, v in ref.items()}
    v = {n: torch.zeros_like(t) for n, t in ref.items()}
    for t in (1, 2):
        # gradients of the float64 reference weights, through a float64 copy of the model
        twin = make_model().double()
        with torch.no_grad():
            for n, p in twin.named_parameters():
                if n in ref:
                    p.copy_(ref[n])
        loss_fn(twin, x.double(), y.double()).backward()
        grads = {n: p.grad for n, p in twin.named_parameters() if n in ref}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        scale = (
            min(1.0, grad_clip / (float(norm) + 1e-6)) if grad_clip else 1.0
        )  # torch's clip_grad_norm_ eps
        loss_fn(engine.unwrap(), x, y).backward()
        out = engine.step()
        assert out["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
        assert out["lr"] == lr and out["skipped"] == 0.0
        for n in ref:
            g = grads[n] * scale
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            ref[n] = ref[n] * (1 - lr * wd) - lr * (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + eps)
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(
                p.detach().double(), ref[n], rtol=1e-5, atol=1e-6
            )  # fp32 vs fp64 update


def test_frozen_parameter_never_changes_nor_enters_the_optimizer() -> None:
    model = make_model()
    frozen = model[0].bias.detach().clone()
    engine = _engine(model)
    train_steps(engine, *make_data(), steps=2)
    torch.testing.assert_close(model[0].bias, frozen, rtol=0, atol=0)
    assert "0.bias" not in engine.state_dict()["optimizer"]["exp_avg"]


def test_accumulating_two_micro_batches_equals_one_step_on_the_whole_batch() -> None:
    x, y = make_data(8)
    whole, split = make_model(), make_model()
    a, b = _engine(whole), _engine(split)
    ra = train_steps(a, x, y, steps=3, micro=1)
    rb = train_steps(b, x, y, steps=3, micro=2)  # backward(loss / 2) twice, then step()
    for sa, sb in zip(ra, rb, strict=True):
        assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-6)
    for pa, pb in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_zero_grad_drops_what_was_accumulated() -> None:
    x, y = make_data(8)
    clean, dirty = make_model(), make_model()
    a, b = _engine(clean), _engine(dirty)
    (loss_fn(b.unwrap(), x * 3, y) * 100).backward()  # e.g. a batch whose loss turned out non-finite
    b.zero_grad()
    train_steps(a, x, y, steps=1)
    train_steps(b, x, y, steps=1)
    for pa, pb in zip(clean.parameters(), dirty.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_non_finite_gradient_skips_the_update() -> None:
    model = make_model()
    engine = _engine(model)
    before = [p.detach().clone() for p in model.parameters()]
    (loss_fn(model, *make_data()) * float("nan")).backward()
    out = engine.step()
    assert out["skipped"] == 1.0 and math.isnan(out["grad_norm"])
    assert engine.num_updates == 0
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_warmup_cosine_schedule_closed_form() -> None:
    # lr 1, 2 warmup updates, cosine over the remaining 4, floor 0.1: values written out by hand
    kw = dict(lr=1.0, schedule="cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    c = math.cos
    expected = [
        0.5,
        1.0,
        1.0,
        0.1 + 0.9 * 0.5 * (1 + c(math.pi / 4)),
        0.55,
        0.1 + 0.9 * 0.5 * (1 + c(3 * math.pi / 4)),
        0.1,
        0.1,
    ]
    assert [lr_at(u, **kw) for u in range(8)] == pytest.approx(expected, abs=1e-12)
    # the cosine part against torch's CosineAnnealingLR (its closed form), floor 0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.0)
    torch_lrs = []
    for _ in range(5):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(u, lr=1.0, schedule="cosine", warmup_steps=2, total_steps=6) for u in range(2, 7)]
    assert ours == pytest.approx(torch_lrs, abs=1e-12)
    assert [lr_at(u, lr=2.0, warmup_steps=4) for u in range(6)] == pytest.approx(
        [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    )


def test_engine_uses_the_schedule_and_counts_updates() -> None:
    model = make_model()
    engine = _engine(model)
    out = train_steps(engine, *make_data(), steps=4)
    assert [o["lr"] for o in out] == pytest.approx(
        [
            lr_at(u, **{k: OPTIM[k] for k in ("lr", "schedule", "warmup_steps", "total_steps")})
            for u in range(4)
        ]
    )
    assert engine.optimizer.param_groups[0]["lr"] == out[-1]["lr"]
    assert engine.num_updates == 4


def test_ema_closed_form_and_swap() -> None:
    d = 0.8
    model = make_model()
    engine = _engine(model, ema_decay=d)
    snapshots = [{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}]
    for _ in range(3):
        train_steps(engine, *make_data(), steps=1)
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in snapshots[0]:
        p0, p1, p2, p3 = (s[n] for s in snapshots)
        expected = d**3 * p0 + (1 - d) * (d**2 * p1 + d * p2 + p3)
        torch.testing.assert_close(engine.ema.shadow[n], expected, rtol=1e-6, atol=1e-7)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with engine.ema_swap():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, engine.ema.shadow.get(n, live[n]), rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, live[n], rtol=0, atol=0)


def test_state_round_trip_continues_identically() -> None:
    x, y = make_data()
    straight = _engine(make_model(), ema_decay=0.9)
    expected = train_steps(straight, x, y, steps=5, micro=2)
    first = _engine(make_model(), ema_decay=0.9)
    train_steps(first, x, y, steps=2, micro=2)
    weights, state = first.trainable_state_dict(), first.state_dict()
    assert state["format"] == STATE_FORMAT and all(t.dtype == torch.float32 for t in weights.values())
    fresh = make_model()  # frozen weights come from the base model; the trainable ones are overwritten
    with torch.no_grad():
        for p in trainable(fresh):
            p.add_(1.0)
    resumed = _engine(fresh, ema_decay=0.9)
    resumed.load_trainable_state_dict(weights)
    resumed.load_state_dict(state)
    got = train_steps(resumed, x, y, steps=3, micro=2)
    assert [g["loss"] for g in got] == [e["loss"] for e in expected[2:]]  # bit-identical on one process
    for a, b in zip(straight.unwrap().parameters(), resumed.unwrap().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for n in straight.ema.shadow:
        torch.testing.assert_close(straight.ema.shadow[n], resumed.ema.shadow[n], rtol=0, atol=0)


def test_bf16_keeps_fp32_master_weights_and_autocasts() -> None:
    model = make_model().to(torch.bfloat16)
    engine = _engine(model, precision="bf16")
    assert all(p.dtype == torch.float32 for p in trainable(model))
    with engine.autocast():
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    out = train_steps(engine, *make_data(), steps=2)
    assert all(math.isfinite(o["loss"]) for o in out)


def test_bad_arguments_name_the_key() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="total_steps"):
        TorchEngine().setup(model, trainable(model), lr=1e-3, schedule="cosine")
    with pytest.raises(ValueError, match="engine.precision"):
        TorchEngine(precision="fp16")
    with pytest.raises(ValueError, match="requires_grad=False"):
        TorchEngine().setup(model, [model[0].bias], lr=1e-3)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        TorchEngine().setup(model, [nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="engine="):
        build_engine("ds_zero1")
    engine = _engine(make_model())
    with pytest.raises(ValueError, match="ema_decay"):
        engine.load_state_dict(_engine(make_model(), ema_decay=0.5).state_dict())


def test_import_is_cheap() -> None:
    code = "import sys, psr.engine, psr.checkpoint, psr.logging; print(sorted({'deepspeed', 'wandb', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
