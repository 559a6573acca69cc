"""psr-plan (psr/plan.py, psr/flops.py): FLOPs against counts written out by hand, memory against
DeepSpeed's own estimators and hand-computed numbers, the full-size symbolic step, the console script.

What ``FlopCounterMode`` counts: ``2 m n k`` per matmul (bias adds not counted), ``4 B H N_q N_k D``
per attention forward (QK^T and AV) and 2.5 times that for its backward (dQ, dK, dV, dP and the
recomputed QK^T); nothing for elementwise ops, norms, softmax, RoPE or sinusoidal embeddings.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from psr.config import compose
from psr.flops import LiveBytes, Meter, flash_attention, repeat_forwards
from psr.plan import (
    FLUX_KONTEXT_DEV,
    EngineSpec,
    PlannerSettings,
    StepFlops,
    make_plan,
    meta_policy,
    model_state_bytes,
    perf_metrics,
    plan_rl,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {"_target_": "psr.models.builders.tiny_flux_kontext", "dtype": "float32"}


# --- Hand-written FLOP counts of FLUX (diffusers' FluxTransformer2DModel) ------------------------


def double_block_flops(n_img: int, n_txt: int, d: int, heads: int, batch: int = 1) -> int:
    """FluxTransformerBlock forward: two AdaLN-Zero (D -> 6D), q/k/v and output projections of the
    image and text streams, two feed-forwards (D -> 4D -> D), joint attention over both streams."""
    n = n_img + n_txt
    norms = 2 * (2 * d * 6 * d)
    qkv = 3 * 2 * n * d * d
    out = 2 * n * d * d
    ff = 2 * (2 * n * d * 4 * d)
    attention = 2 * 2 * heads * n * n * (d // heads)  # QK^T and AV
    return batch * (norms + qkv + out + ff + attention)


def single_block_flops(n: int, d: int, heads: int, batch: int = 1) -> int:
    """FluxSingleTransformerBlock forward: AdaLN-Zero-single (D -> 3D), q/k/v, the parallel MLP
    (D -> 4D), attention, and the output projection of [attention, MLP] (5D -> D)."""
    norm = 2 * d * 3 * d
    qkv = 3 * 2 * n * d * d
    mlp = 2 * n * d * 4 * d
    out = 2 * n * 5 * d * d
    attention = 2 * 2 * heads * n * n * (d // heads)
    return batch * (norm + qkv + mlp + out + attention)


def transformer_flops(cfg: dict, n_img: int, n_txt: int, batch: int) -> int:
    """A whole FluxTransformer2DModel forward (patch size 1, guidance embedding on)."""
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    d, c = heads * hd, cfg["in_channels"]
    embed = 2 * n_img * c * d + 2 * n_txt * cfg["joint_attention_dim"] * d
    time_guidance_text = 2 * (2 * (256 * d + d * d)) + 2 * (cfg["pooled_projection_dim"] * d + d * d)
    head = 2 * d * 2 * d + 2 * n_img * d * c  # AdaLN-continuous (D -> 2D) and the output projection
    per_sample = embed + time_guidance_text + head
    return (
        batch * per_sample
        + cfg["num_layers"] * double_block_flops(n_img, n_txt, d, heads, batch)
        + cfg["num_single_layers"] * single_block_flops(n_img + n_txt, d, heads, batch)
    )


def run_transformer(transformer, batch: int, n_img: int, n_txt: int, dtype=torch.float32):
    cfg = transformer.config
    meta = {"device": "meta"}
    return transformer(
        hidden_states=torch.empty(batch, n_img, cfg.in_channels, dtype=dtype, **meta),
        timestep=torch.ones(batch, **meta),
        guidance=torch.ones(batch, **meta),
        pooled_projections=torch.empty(batch, cfg.pooled_projection_dim, dtype=dtype, **meta),
        encoder_hidden_states=torch.empty(batch, n_txt, cfg.joint_attention_dim, dtype=dtype, **meta),
        txt_ids=torch.zeros(n_txt, 3, **meta),
        img_ids=torch.zeros(n_img, 3, **meta),
        return_dict=False,
    )[0]


@pytest.fixture(scope="module")
def tiny_meta():
    return meta_policy(TINY)


def test_tiny_flux_kontext_flops_equal_the_hand_count_and_flop_counter_mode(tiny_meta):
    transformer = tiny_meta.transformer
    cfg = dict(transformer.config)
    batch, n_img, n_txt = 3, 16 + 32, 32  # 64 px target + two references, 32 text tokens
    expected = transformer_flops(cfg, n_img, n_txt, batch)
    meter = Meter()
    with torch.no_grad(), flash_attention(), meter:
        run_transformer(transformer, batch, n_img, n_txt)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        run_transformer(transformer, batch, n_img, n_txt)  # the math attention: its bmm's, same count
    assert meter.flops == expected == plain.get_total_flops()


def test_full_size_blocks_flops_forward_and_backward():
    """One FLUX.1 Kontext double and single block at 512 px with 2 references (1024 + 2048 image
    tokens, 512 text tokens). Backward: every matmul twice more (input and weight gradients),
    attention 2.5 times its forward (FlopCounterMode's flash backward formula)."""
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    d, heads, n_img, n_txt = 3072, 24, 3072, 512
    with torch.device("meta"):
        double = FluxTransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=128)
        single = FluxSingleTransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=128)
    img = torch.empty(1, n_img, d, device="meta", requires_grad=True)
    txt = torch.empty(1, n_txt, d, device="meta", requires_grad=True)
    temb = torch.empty(1, d, device="meta", requires_grad=True)
    attention = 4 * heads * (n_img + n_txt) ** 2 * 128
    for block, expected in (
        (double, double_block_flops(n_img, n_txt, d, heads)),
        (single, single_block_flops(n_img + n_txt, d, heads)),
    ):
        meter = Meter()
        with flash_attention(), meter:
            out = block(hidden_states=img, encoder_hidden_states=txt, temb=temb)
        assert meter.flops == expected
        with flash_attention(), meter:
            sum(o.float().sum() for o in out).backward()
        matmuls = expected - attention
        assert meter.flops == expected + 2 * matmuls + 2.5 * attention


def test_repeat_forwards_adds_the_first_calls_flops_and_returns_its_shapes():
    lin = torch.nn.Linear(8, 4, device="meta")
    meter = Meter(exclude=lin.parameters())
    x = torch.empty(5, 8, device="meta")
    with torch.no_grad(), repeat_forwards(lin, meter), meter:
        outs = [lin(x) for _ in range(3)]
        other = lin(torch.empty(2, 8, device="meta"))  # a new shape runs
    assert meter.flops == 3 * 2 * 5 * 8 * 4 + 2 * 2 * 8 * 4
    assert [o.shape for o in outs] == [torch.Size([5, 4])] * 3 and other.shape == (2, 4)
    assert "forward" not in lin.__dict__  # the module's own forward again


def test_live_bytes_counts_new_storages_until_they_die():
    weight = torch.empty(1000, device="meta")
    live = LiveBytes(exclude=[weight])
    with live:
        a = weight * 2  # 4000 bytes
        view = a[:10]  # a view: no new storage
        b = a + 1  # 8000 alive
        del a, view
        c = weight.view(10, 100)  # a view of an excluded storage
    assert (live.peak, live.live) == (8000, 4000)
    del b, c
    assert live.live == 0


def test_flash_attention_holds_no_score_matrix():
    """The [B, H, N, N] scores of the math fallback (fp32: 4 bytes each) never exist under flash_attention."""
    q = torch.empty(1, 4, 512, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    scores = 4 * 512 * 512 * 4
    meter = Meter(exclude=[q])
    with flash_attention(), meter:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        out.float().sum().backward()
    assert meter.flops == 4 * 4 * 512 * 512 * 64 * (1 + 2.5)
    assert meter.bytes.peak < scores
    plain = Meter(exclude=[q])
    with plain:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).float().sum().backward()
    assert plain.bytes.peak > scores  # what the planner avoids counting


# --- Memory of model states against DeepSpeed's estimators ---------------------------------------


def _flux_sizes() -> tuple[int, int]:
    """FLUX.1 Kontext-dev transformer: parameters and the largest module's own parameters."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        t = FluxTransformer2DModel.from_config(FLUX_KONTEXT_DEV["transformer"])
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in t.modules())
    return sum(p.numel() for p in t.parameters()), largest


def _printed_gb(text: str, options: str) -> float:
    """The per-GPU GB of the row of an ``estimate_*_all_cold`` printout with these options."""
    for line in text.splitlines():
        if line.rstrip().endswith(options):
            return float(re.findall(r"([\d.]+)GB", line)[1])
    raise AssertionError(f"no row {options!r} in {text}")


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_full_finetuning_states_equal_deepspeeds_estimators(gpus, capsys):
    """Like for like: every parameter trained, bf16 weights, fp32 master weights and AdamW moments
    (DeepSpeed's estimators assume 16-bit weights and fp32 Adam states), no EMA."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    total, largest = _flux_sizes()
    assert total == 11_901_408_320  # FLUX.1 Kontext-dev's transformer

    def mine(engine: EngineSpec) -> float:
        return sum(
            model_state_bytes(
                engine, frozen=0, trainable=total, world_size=gpus, largest_layer=largest
            ).values()
        )

    for offload in (False, True):
        ds2 = estimate_zero2_model_states_mem_needs(total, gpus, cpu_offload=offload)[1]
        assert abs(mine(EngineSpec("zero2", offload_optimizer=offload)) - ds2) < 2
    ds3 = estimate_zero3_model_states_mem_needs(
        total, largest, gpus, cpu_offload=False, cpu_offload_params=False
    )
    assert abs(mine(EngineSpec("zero3")) - ds3[1]) < 2
    assert (
        mine(EngineSpec("zero3", offload_optimizer=True, offload_params=True)) == ds3[2]
    )  # the gathered layer
    # the tables the *_all_cold estimators print (GB = 2^30 bytes, two decimals), rows without offload
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus)
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus)
    printed = capsys.readouterr().out
    assert _printed_gb(printed, "| offload_optimizer=none") == pytest.approx(
        mine(EngineSpec("zero2")) / 2**30, abs=0.006
    )
    row3 = "offload_param=none, offload_optimizer=none, zero_init=1"
    assert _printed_gb(printed, row3) == pytest.approx(mine(EngineSpec("zero3")) / 2**30, abs=0.006)


def test_lora_and_plain_engine_states_by_hand():
    """LoRA: the frozen base is only weights (bf16, replicated under ZeRO-2, partitioned under ZeRO-3);
    the adapter alone has gradients and AdamW state. DeepSpeed's estimators would count all 12B
    parameters as trained (~10x more optimizer memory on 8 GPUs); they do not apply to LoRA."""
    frozen, lora, n = 11_901_408_320, 104_595_456, 8
    z2 = model_state_bytes(EngineSpec("zero2"), frozen=frozen, trainable=lora, world_size=n)
    assert z2 == {
        "weights": 2 * (frozen + lora),
        "grads": 6 * lora / n,
        "optimizer": 12 * lora / n,
        "ema": 0.0,
    }
    z3 = model_state_bytes(
        EngineSpec("zero3", ema=True), frozen=frozen, trainable=lora, world_size=n, largest_layer=100
    )
    assert z3 == {
        "weights": 2 * (frozen + lora) / n + 400,
        "grads": 4 * lora / n,
        "optimizer": 12 * lora / n,
        "ema": 4 * lora,
    }
    # the plain engine under bf16: fp32 master copies of the trained weights, AdamW moments in fp32
    torch_bf16 = model_state_bytes(
        EngineSpec("torch", "bf16", ema=True), frozen=frozen, trainable=lora, world_size=n
    )
    assert torch_bf16 == {
        "weights": 2 * frozen + 4 * lora,
        "grads": 4 * lora,
        "optimizer": 8 * lora,
        "ema": 4 * lora,
    }
    full_fp32 = model_state_bytes(
        EngineSpec("torch", "fp32"), frozen=0, trainable=10, world_size=n, trainable_bytes=2
    )
    assert full_fp32 == {"weights": 20, "grads": 20, "optimizer": 40, "ema": 0.0}


def test_perf_metrics_by_hand():
    assert perf_metrics(1e15, 2.0, 989.0) == {"perf/tflops": 500.0, "perf/mfu": 500.0 / 989.0}
    assert perf_metrics(1e15, 2.0, None) == {"perf/tflops": 500.0}
    assert perf_metrics(1e15, 0.0, 989.0) == {}


# --- The planner on the tiny model --------------------------------------------------------------


def test_tiny_rl_plan_counts_every_forward(tiny_meta):
    """Full fine-tuning (no adapter FLOPs): the rollout is K transformer forwards at batch G plus the
    VAE decode of G images, per group (repeat_forwards must add every skipped forward); the update
    is one forward and backward per trained step and sample."""
    import copy

    plan, _ = make_plan(
        ["experiment=quickstart", "train.mode=full", "train.group_size=3", "train.prompts_per_step=2"]
    )
    cfg = dict(tiny_meta.transformer.config)
    tokens = plan.setting["tokens"]
    n_img, n_txt = tokens["target"] + tokens["references"], tokens["text"]
    with torch.no_grad(), FlopCounterMode(display=False) as decode:
        tiny_meta.vae.decode(torch.empty(3, 4, 8, 8, device="meta"))  # 64 px: an 8 x 8 latent
    rollout = next(p for p in plan.phases if p.name == "rollout")
    assert rollout.flops == 2 * (6 * transformer_flops(cfg, n_img, n_txt, batch=3) + decode.get_total_flops())
    trained = copy.deepcopy(tiny_meta.transformer).requires_grad_(True)
    with flash_attention(), FlopCounterMode(display=False) as step:  # the planner's attention kernel
        run_transformer(trained, 3, n_img, n_txt)[:, : tokens["target"]].float().square().mean().backward()
    update = next(p for p in plan.phases if p.name == "update")
    assert update.flops == pytest.approx(5 * 2 * step.get_total_flops())  # 5 trained steps, 2 groups of 3
    assert all(plan.fits(p) for p in plan.phases)


def test_step_flops_sums_records_by_reference_count():
    cfg = compose("sft", ["experiment=quickstart"])
    flops = StepFlops(cfg, "sft")
    one, two = flops.per_unit(1), flops.per_unit(2)
    assert two > one > 0
    assert flops([2, 1, 2]) == 2 * two + one
    assert flops._cache.keys() == {1, 2}  # measured once per count


def test_plan_settings_and_config_errors_name_the_key():
    from psr.config import ConfigError

    with pytest.raises(ConfigError, match="plan.world_size=0: must be >= 1"):
        make_plan(["experiment=quickstart", "plan.world_size=0"])
    with pytest.raises(ConfigError, match="train.stepz"):
        make_plan(["experiment=quickstart", "+train.stepz=3"])
    with pytest.raises(ValueError, match="expected rl or sft"):
        PlannerSettings(trainer="dpo")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(BIN / "psr-plan"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_tiny_end_to_end(tmp_path):
    out = tmp_path / "plan.json"
    done = run_cli("experiment=quickstart", "engine=ds_zero2", f"plan.json={out}")
    assert done.returncode == 0, done.stderr
    assert "engine zero2 (bf16)" in done.stdout and re.search(r"^update .* yes ", done.stdout, re.M)
    plan = json.loads(out.read_text())
    assert [p["name"] for p in plan["phases"]] == ["condition", "rollout", "reward", "update"]
    assert plan["step_tflops"] == pytest.approx(sum(p["flops"] for p in plan["phases"]) / 1e12)


def test_cli_errors_name_the_key(capsys):
    from psr.plan import main

    with pytest.raises(SystemExit, match="train.grup_size"):
        main(["--sft", "experiment=quickstart", "train.grup_size=1"])
    main(["--help"])
    assert "plan.* keys" in capsys.readouterr().out


# --- Full size ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_symbolic_step_is_cheap_and_shaped():
    """FLUX.1 Kontext-dev, LoRA 64, 2 references at 512 px: one RL step on the meta device within a
    minute of CPU time (wall time is longer on a loaded machine) and without weight memory."""
    cfg = compose("rl", ["experiment=psr_rl", "train.prompts_per_step=1", "sampler.num_steps=28"])

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    rss, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cpu()
    plan = plan_rl(cfg, PlannerSettings(num_references=2))
    seconds, grown_mb = cpu() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    print(f"full-size symbolic step: {seconds:.1f} s CPU, max RSS +{grown_mb:.0f} MB")
    assert seconds < 60 and grown_mb < 500
    assert plan.setting["tokens"] == {"target": 1024, "references": 2048, "text": 512}
    assert plan.sizes["transformer"] - plan.sizes["trainable"] == 11_901_408_320
    rollout = next(p for p in plan.phases if p.name == "rollout")
    forward = transformer_flops(FLUX_KONTEXT_DEV["transformer"], 3072, 512, batch=6)
    assert forward * 28 < rollout.flops < forward * 28 * 1.03  # + LoRA and the VAE decode


@pytest.mark.slow
def test_cli_full_size(tmp_path):
    done = run_cli(
        "experiment=psr_rl", "engine=ds_zero2", "train.prompts_per_step=1", f"plan.json={tmp_path / 'p.json'}"
    )
    assert done.returncode == 0, done.stderr
    assert "tokens {'target': 1024, 'references': 2048, 'text': 512}" in done.stdout
    assert json.loads((tmp_path / "p.json").read_text())["setting"]["engine"] == "zero2"


def test_psr_sft_logs_tflops_and_mfu(tmp_path):
    """psr-sft with ``peak_tflops``: perf/tflops is the step's planned FLOPs (per record, by its
    reference count) over time/update, and perf/mfu its fraction of the peak."""
    from psr.trainers import run_trainer
    from psr.trainers.sft import SFTTrainer

    small = [
        "data=synthetic",
        "data.num_records=6",
        "data.heldout=2",
        "data.image_size=32",
        "dataset.resolution=32",
    ]
    cfg = compose(
        "sft",
        [*small, "train.micro_batch_size=2", "train.lora.rank=4", "train.steps=1", "loader.num_workers=0",
         "validation.every=0", f"run_dir={tmp_path}", "peak_tflops=100"],
    )  # fmt: skip
    trainer = SFTTrainer(cfg)
    run_trainer(trainer, "psr-sft")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "perf/tflops" in r)
    assert row["perf/mfu"] == pytest.approx(row["perf/tflops"] / 100)
    flops = row["perf/tflops"] * row["time/update"] * 1e12
    per_record = list(trainer.step_flops._cache.values())
    assert any(flops == pytest.approx(a + b, rel=1e-9) for a in per_record for b in per_record)


# --- FLUX.2 klein and Qwen-Image-Edit (psr-plan model=flux2_klein / qwen_image_edit_plus) ----------


def klein_double_block_flops(n_img: int, n_txt: int, d: int, heads: int, mlp_ratio: float = 3.0) -> int:
    """Flux2TransformerBlock forward (modulation is computed once per model, outside the blocks):
    q/k/v and output projections of both streams, two SwiGLU feed-forwards (D -> 2 * 3D, gated to
    3D -> D), joint attention."""
    n, h = n_img + n_txt, int(d * mlp_ratio)
    qkv_out = 4 * 2 * n * d * d
    ff = 2 * n * d * 2 * h + 2 * n * h * d
    return qkv_out + ff + 4 * heads * n * n * (d // heads)


def klein_single_block_flops(n: int, d: int, heads: int, mlp_ratio: float = 3.0) -> int:
    """Flux2SingleTransformerBlock forward: one fused projection to q, k, v and the SwiGLU input
    (D -> 3D + 2 * 3D), attention, the output projection of [attention, gated MLP] (D + 3D -> D)."""
    h = int(d * mlp_ratio)
    return 2 * n * d * (3 * d + 2 * h) + 2 * n * (d + h) * d + 4 * heads * n * n * (d // heads)


def qwen_block_flops(n_img: int, n_txt: int, d: int, heads: int) -> int:
    """QwenImageTransformerBlock forward: per stream a modulation (D -> 6D on the timestep embedding),
    q/k/v and output projections, a GELU feed-forward (D -> 4D -> D); joint attention."""
    n = n_img + n_txt
    mods = 2 * (2 * d * 6 * d)
    return mods + 4 * 2 * n * d * d + 2 * (2 * n * d * 4 * d) + 4 * heads * n * n * (d // heads)


@pytest.mark.parametrize("variant", ["4b", "9b"])
def test_full_size_klein_blocks_flops(variant):
    """FLUX.2 klein's published blocks at 512 px with 2 references (1024 + 2048 image tokens, 512
    text tokens), forward, and backward = twice the matmuls + 2.5 times the attention."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2SingleTransformerBlock,
        Flux2TransformerBlock,
    )

    from psr.plan import FLUX2_KLEIN

    cfg = FLUX2_KLEIN[variant]["transformer"]
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    d, n_img, n_txt = heads * hd, 3072, 512
    with torch.device("meta"):
        double = Flux2TransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=hd)
        single = Flux2SingleTransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=hd)
    img = torch.empty(1, n_img, d, device="meta", requires_grad=True)
    txt = torch.empty(1, n_txt, d, device="meta", requires_grad=True)
    mod = torch.empty(1, 6 * d, device="meta", requires_grad=True)
    attention = 4 * heads * (n_img + n_txt) ** 2 * hd
    runs = (
        (lambda: double(img, txt, mod, mod), klein_double_block_flops(n_img, n_txt, d, heads)),
        (lambda: single(img, txt, mod[:, : 3 * d]), klein_single_block_flops(n_img + n_txt, d, heads)),
    )
    for run, expected in runs:
        meter = Meter()
        with flash_attention(), meter:
            out = run()
        assert meter.flops == expected
        with flash_attention(), meter:
            sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
        assert meter.flops == expected + 2 * (expected - attention) + 2.5 * attention


def test_full_size_qwen_image_block_flops():
    """One Qwen-Image block (width 3072, 24 heads) at 512 px with 2 references encoded at 1024 px
    (1024 + 2 x 4096 image tokens) and 424 text tokens, forward and backward."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    d, heads, n_img, n_txt = 3072, 24, 1024 + 2 * 4096, 424
    with torch.device("meta"):
        block = QwenImageTransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=128)
    img = torch.empty(1, n_img, d, device="meta", requires_grad=True)
    txt = torch.empty(1, n_txt, d, device="meta", requires_grad=True)
    temb = torch.empty(1, d, device="meta", requires_grad=True)
    expected = qwen_block_flops(n_img, n_txt, d, heads)
    meter = Meter()
    with flash_attention(), meter:
        out = block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None, temb=temb)
    assert meter.flops == expected
    with flash_attention(), meter:
        sum(o.float().sum() for o in out).backward()
    attention = 4 * heads * (n_img + n_txt) ** 2 * 128
    assert meter.flops == expected + 2 * (expected - attention) + 2.5 * attention


@pytest.mark.parametrize(
    ("model", "variant", "transformer", "text_encoder"),
    [
        ("flux2_klein", None, 3_875_544_576, 4_022_468_096),  # FLUX.2 klein 4B; Qwen3-4B
        ("flux2_klein", "9b", 9_078_581_248, 8_190_735_360),  # FLUX.2 klein 9B; Qwen3-8B
        ("qwen_image_edit_plus", None, 20_430_401_088, 8_292_166_656),  # Qwen-Image 20B; Qwen2.5-VL-7B
    ],
)
def test_meta_backbones_have_the_published_sizes(model, variant, transformer, text_encoder):
    """Parameters of the meta-built models: FLUX.2 klein 4B (3.88 B) and 9B (9.08 B) transformers,
    Qwen-Image's 20.43 B; Qwen3-4B 4.02 B, Qwen3-8B 8.19 B, Qwen2.5-VL-7B 8.29 B (with its vision tower)."""
    target = {"flux2_klein": "psr.models.flux2_klein.flux2_klein",
              "qwen_image_edit_plus": "psr.models.qwen_image_edit.qwen_image_edit_plus"}[model]  # fmt: skip
    policy = meta_policy({"_target_": target, "dtype": "bfloat16"}, variant)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(policy.transformer), count(policy.text_encoder)) == (transformer, text_encoder)
    assert {p.device.type for p in policy.parameters()} == {"meta"}
    published = {
        ("flux2_klein", None): 3.88,
        ("flux2_klein", "9b"): 9.08,
        ("qwen_image_edit_plus", None): 20.43,
    }
    assert round(count(policy.transformer) / 1e9, 2) == published[model, variant]


def test_klein_variant_errors_name_the_key():
    from psr.config import ConfigError

    with pytest.raises(ConfigError, match="plan.variant='12b'"):
        make_plan(["experiment=quickstart", "plan.variant=12b"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "tokens"),
    [
        ("flux2_klein", {"target": 1024, "references": 2048, "text": 512}),
        ("qwen_image_edit_plus", {"target": 1024, "references": 8192, "text": 424}),
    ],
)
def test_full_size_backbone_symbolic_step(model, tokens):
    """One RL step of FLUX.2 klein 4B (true CFG: one batch-2G forward per velocity) and of
    Qwen-Image-Edit 20B (true CFG: two forwards; Qwen2.5-VL reads the references, its vision tower on
    meta), LoRA 64, 2 references at 512 px, without weight memory. The rollout is at least the K
    transformer forwards of both CFG branches written out by hand (blocks only)."""
    cfg = compose("rl", ["experiment=psr_rl", f"model={model}", "train.prompts_per_step=1"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = plan_rl(cfg, PlannerSettings(num_references=2))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown_mb < 500 and plan.setting["tokens"] == tokens
    n_img, n_txt = tokens["target"] + tokens["references"], tokens["text"]
    rollout = next(p for p in plan.phases if p.name == "rollout").flops
    if model == "flux2_klein":
        blocks = 5 * klein_double_block_flops(n_img, n_txt, 3072, 24) + 20 * klein_single_block_flops(
            n_img + n_txt, 3072, 24
        )
        assert 28 * 12 * blocks < rollout < 28 * 12 * blocks * 1.05  # batch 2G = 12
    else:
        neg = n_txt - 1  # the negative prompt " " (with the same two pictures) is one token shorter
        blocks = 60 * 6 * (qwen_block_flops(n_img, n_txt, 3072, 24) + qwen_block_flops(n_img, neg, 3072, 24))
        assert 28 * blocks < rollout < 28 * blocks * 1.05
    assert all(p.flops > 0 for p in plan.phases if p.name != "reward")
