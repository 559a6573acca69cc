"""DeepSpeedEngine (ZeRO-2 / ZeRO-3, one gloo process) against TorchEngine on the same problem.

Tolerance: 1e-6 on parameters, optimizer moments and grad norms. The same fp32 update is computed
in a different order (flat partitions, DeepSpeed's norm); measured differences are ~3e-8.
"""

from __future__ import annotations

import pytest
import torch
from engine_cases import OPTIM, loss_fn, make_data, make_model, train_steps, trainable

from psr.engine import DeepSpeedEngine, TorchEngine, deepspeed_config

pytestmark = pytest.mark.usefixtures("ds_env")
TOL = dict(rtol=1e-6, atol=1e-6)


def _ds(stage: int, model: torch.nn.Module | None = None, **kw) -> DeepSpeedEngine:
    model = make_model() if model is None else model
    # threshold 0: ZeRO-3 partitions even these tiny weights, so gathering is really exercised
    engine = DeepSpeedEngine(
        stage=stage, precision=kw.pop("precision", "fp32"), zero3_persistence_threshold=0, **kw
    )
    engine.setup(model, trainable(model), **OPTIM)
    return engine


def _torch(model: torch.nn.Module | None = None, **kw) -> TorchEngine:
    model = make_model() if model is None else model
    engine = TorchEngine(**kw)
    engine.setup(model, trainable(model), **OPTIM)
    return engine


def _assert_state_close(a: dict, b: dict) -> None:
    assert a["num_updates"] == b["num_updates"]
    assert a["optimizer"]["step"] == b["optimizer"]["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        for n, t in a["optimizer"][key].items():
            torch.testing.assert_close(t, b["optimizer"][key][n], **TOL)


def test_config_is_rendered_from_the_trainer_keys() -> None:
    cfg = deepspeed_config(
        stage=3, precision="bf16", grad_clip=1.0, grad_accum=4, micro_batch_size=2, world_size=8
    )
    assert cfg["train_batch_size"] == 2 * 4 * 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["zero_optimization"]["stage"] == 3
    assert cfg["managed_gradient_accumulation"] is False and "optimizer" not in cfg and "scheduler" not in cfg
    assert "auto" not in repr(cfg)
    off = deepspeed_config(
        stage=2, precision="fp32", grad_clip=None, grad_accum=1, micro_batch_size=1, world_size=1
    )
    assert off["gradient_clipping"] == 0.0 and not off["bf16"]["enabled"]
    with pytest.raises(ValueError, match="engine.stage"):
        deepspeed_config(
            stage=1, precision="fp32", grad_clip=None, grad_accum=1, micro_batch_size=1, world_size=1
        )
    with pytest.raises(ValueError, match="offload_params"):
        deepspeed_config(
            stage=2,
            precision="fp32",
            grad_clip=None,
            grad_accum=1,
            micro_batch_size=1,
            world_size=1,
            offload_params=True,
        )


@pytest.mark.parametrize("stage", [2, 3])
def test_steps_equal_torch_engine(stage: int) -> None:
    x, y = make_data()
    ref, ds = _torch(ema_decay=0.9), _ds(stage, ema_decay=0.9)
    r_out = train_steps(ref, x, y, steps=3, micro=2)
    d_out = train_steps(ds, x, y, steps=3, micro=2)
    for r, d in zip(r_out, d_out, strict=True):
        assert d["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert d["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-6)
        assert d["lr"] == r["lr"] and d["skipped"] == 0.0
    weights = ds.trainable_state_dict()
    for n, t in ref.trainable_state_dict().items():
        torch.testing.assert_close(weights[n], t, **TOL)
    _assert_state_close(ds.state_dict(), ref.state_dict())
    for n, t in ref.ema.shadow.items():
        torch.testing.assert_close(ds.ema.shadow[n], t, **TOL)
    assert "0.bias" not in weights  # the frozen parameter stays out


@pytest.mark.parametrize("stage", [2, 3])
def test_state_round_trip_and_cross_engine_resume(stage: int) -> None:
    """DeepSpeed state -> fresh DeepSpeed engine and -> TorchEngine: both continue like no stop."""
    x, y = make_data()
    straight = _torch()
    expected = train_steps(straight, x, y, steps=5, micro=2)
    first = _ds(stage)
    train_steps(first, x, y, steps=2, micro=2)
    weights, state = first.trainable_state_dict(), first.state_dict()
    for target in (_ds(stage), _torch()):
        target.load_trainable_state_dict(weights)
        target.load_state_dict(state)
        got = train_steps(target, x, y, steps=3, micro=2)
        assert [g["loss"] for g in got] == pytest.approx([e["loss"] for e in expected[2:]], rel=1e-6)
        for n, t in straight.trainable_state_dict().items():
            torch.testing.assert_close(target.trainable_state_dict()[n], t, **TOL)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_grad_drops_what_was_accumulated(stage: int) -> None:
    x, y = make_data()
    clean, dirty = _ds(stage), _ds(stage)
    dirty.backward(loss_fn(dirty.unwrap(), x * 3, y) * 100)
    dirty.zero_grad()
    a, b = train_steps(clean, x, y, steps=2), train_steps(dirty, x, y, steps=2)
    assert [s["grad_norm"] for s in a] == pytest.approx([s["grad_norm"] for s in b], rel=1e-6)
    for n, t in clean.trainable_state_dict().items():
        torch.testing.assert_close(dirty.trainable_state_dict()[n], t, **TOL)


@pytest.mark.timeout(60)  # a ZeRO-3 gather that waits for a peer would hang here
def test_zero3_gathered_forward_equals_plain_model_and_training_goes_on() -> None:
    x, y = make_data()
    ds, ref = _ds(3), _torch()
    train_steps(ds, x, y, steps=1)
    train_steps(ref, x, y, steps=1)
    module = ds.unwrap()
    assert all(p.numel() == 0 for p in module.parameters())  # really partitioned outside the block
    with torch.no_grad(), ds.gathered_parameters() as gathered:
        outs = [gathered(x) for _ in range(3)]  # several forwards, no collective inside
        assert all(p.numel() > 0 for p in gathered.parameters())
    with torch.no_grad():
        expected = ref.unwrap()(x)
    for out in outs:
        torch.testing.assert_close(out, expected, **TOL)
    # the ZeRO-3 hooks are back: training continues and still matches
    a, b = train_steps(ds, x, y, steps=2), train_steps(ref, x, y, steps=2)
    assert [s["loss"] for s in a] == pytest.approx([s["loss"] for s in b], rel=1e-6)


@pytest.mark.timeout(60)
def test_zero3_ema_swap_evaluates_the_ema_weights() -> None:
    x, y = make_data()
    ds, ref = _ds(3, ema_decay=0.5), _torch(ema_decay=0.5)
    train_steps(ds, x, y, steps=2)
    train_steps(ref, x, y, steps=2)
    with torch.no_grad():
        with ref.ema_swap():
            expected = ref.unwrap()(x)
        live = ref.unwrap()(x)
        with ds.ema_swap():
            got = ds.unwrap()(x)
        torch.testing.assert_close(got, expected, **TOL)
        torch.testing.assert_close(ds.unwrap()(x), live, **TOL)  # restored after the block


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_runs_with_fp32_master_weights(stage: int) -> None:
    ds = _ds(stage, precision="bf16")
    before = ds.trainable_state_dict()
    out = train_steps(ds, *make_data(), steps=2)
    assert all(o["skipped"] == 0.0 and o["grad_norm"] > 0 for o in out)
    after = ds.trainable_state_dict()
    assert all(t.dtype == torch.float32 for t in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in after)  # every trainable tensor moved


@pytest.mark.parametrize(
    "stage, offload",
    [(2, {"offload_optimizer": True}), (3, {"offload_optimizer": True, "offload_params": True})],
)
def test_offload_matches_and_round_trips(stage: int, offload: dict) -> None:
    x, y = make_data()
    ref = _torch()
    expected = train_steps(ref, x, y, steps=3, micro=2)
    first = _ds(stage, **offload)
    got = train_steps(first, x, y, steps=2, micro=2)
    assert [g["grad_norm"] for g in got] == pytest.approx([e["grad_norm"] for e in expected[:2]], rel=1e-6)
    resumed = _ds(stage, **offload)
    resumed.load_trainable_state_dict(first.trainable_state_dict())
    resumed.load_state_dict(first.state_dict())
    train_steps(resumed, x, y, steps=1, micro=2)
    for n, t in ref.trainable_state_dict().items():
        torch.testing.assert_close(resumed.trainable_state_dict()[n], t, **TOL)
