"""Time and memory of one psr-rl step, split into rollout / reward / update, vs the step's settings.

The real recipe: ``conf/rl.yaml`` composed with Hydra (``experiment=quickstart`` plus overrides), a
:class:`psr.trainers.rl.RLTrainer` built with ``setup()``, and per step what ``train()`` times:
``rollout`` (conditioning + P groups of G SDE samples), ``score`` (the colour reward: weight-free, so
the reward column is the reward code's overhead, not a reward model's), ``update`` (advantages or
DPO pairs and the objective's forward/backward/optimizer steps). One step of warm-up, then the
median of ``--repeats`` steps. The number of references is set through the synthetic data
(``data.num_subjects=[n]``: every record has n subjects, each with a reference).

Backbones are an axis like the others (``--backbones``: ``model=`` configs, FLUX.1 Kontext's ``tiny``
first). One axis at a time around a base setting: the first value of each list option (``--group-sizes
4 2 8``: base G = 4; each axis's other values are printed in ascending order). ``--grid`` runs every
combination instead. GRPO's ``beta > 0`` adds the reference forward (LoRA: adapters disabled; full:
a frozen copy of the transformer); DPO always has one, and its own beta (the config's) is not
varied. Columns: target tokens N, reference tokens R, median
milliseconds per phase and per step, peak CUDA memory allocated during the rollout and the update
(n/a on the CPU), and the process's peak resident memory so far (``getrusage``; it only grows, so
later rows include earlier ones).

    python benchmarks/rl_step.py                          # tiny model on the CPU (~15-40 s)
    python benchmarks/rl_step.py --flux-size --repeats 2  # FLUX.1-size random weights, CUDA only
    python benchmarks/rl_step.py --overlap                # the reward beside the rollout (~2-4 min)

``--flux-size`` replaces ``cfg.model`` with FLUX.1-size random weights (``flux_size_policy`` in
``benchmarks/sft_step.py``: 19 + 38 blocks, 3072 wide, bf16, the 16-channel FLUX VAE, toy text
encoders of the right widths; gradient checkpointing on) and runs in bf16 autocast with LoRA rank 64
(``conf/rl.yaml``'s default). Full fine-tuning a 12B transformer with AdamW does not fit one GPU
(``--modes full`` is allowed but not in its defaults). Nothing is downloaded. The tiny model's
timings are for comparing rows of one run; they do not predict a real model's.

``--overlap`` prints another table: whole ``train()`` steps (``reward_serving``, ``rewards/serving.py``)
with a reward made slow on purpose (:class:`SlowReward`: the colour reward plus a fixed time per
image, slept by default like a judge on another GPU or behind a server, or ``--work compute``: matrix
products on this CPU), at ``--reward-ratios`` times the rollout's time per image (measured first, in
turn, with no delay). Each ratio runs in turn (``overlap=false``), in a background thread
(``overlap=true``) and in one worker process (``workers=1``); the columns are the medians of
``time/rollout``, ``time/reward_compute`` (all the reward's work), ``time/reward`` (the part the
step waited for) and ``time/update``, the step (their sum), the ideal ``max(rollout, reward) +
update``, and the share of the smaller of rollout and reward that was hidden,
``(rollout + reward + update - step) / min(rollout, reward)``. Overlap works a group at a time, and
the last group's reward always waits (the update needs every reward of the step), so the share
hidden is at most ``(P - 1) / P`` (the ``bound`` column): P defaults to 8 here.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# run as a script, this file's folder comes first on sys.path and benchmarks/rewards.py would shadow
# the `rewards` package the reward config points at: the repository root first, this folder last
# (for ``sft_step.flux_size_policy``)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
sys.path.append(str(_HERE))
if str(getattr(sys.modules.get("rewards"), "__file__", "")).startswith(str(_HERE)):
    sys.modules.pop("rewards")  # benchmarks/rewards.py; the package is imported again from the root

CONF = str(_HERE.parent / "conf")
OVERLAP_MODES = {
    "in turn": ["reward_serving.overlap=false"],
    "thread": ["reward_serving.overlap=true"],
    "worker": ["reward_serving.workers=1"],
}
AXES = ("model", "G", "refs", "res", "algo", "mode", "beta")
# --flux-size: the published sizes with random weights, per backbone (benchmarks/sft_step.py, sampler.py)
FULL_SIZE = {
    "tiny": {"_target_": "sft_step.flux_size_policy", "gradient_checkpointing": True},
    "tiny_flux2_klein": {"_target_": "sampler.klein_size_policy", "gradient_checkpointing": True},
    "tiny_qwen_image_edit_plus": {
        "_target_": "sampler.qwen_image_edit_size_policy",
        "gradient_checkpointing": True,
    },
}


class SlowReward:
    """The colour reward (``rewards/color.py``) made slow on purpose: ``ms_per_image`` per image, slept
    (``work=sleep``) or spent on 128 x 128 matrix products on this CPU (``work=compute``: a fixed
    number of them per image, calibrated when the reward is built). The scores are the colour
    reward's."""

    def __init__(self, ms_per_image: float, work: str = "sleep", use_std: bool = False) -> None:
        from rewards.color import ColorReward

        if work not in ("sleep", "compute"):
            raise ValueError(f"SlowReward: work={work!r}; expected sleep or compute")
        self.colour, self.ms_per_image, self.work = ColorReward(use_std=use_std), float(ms_per_image), work
        self._a = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        self._products(200)
        self.products_per_image = round(self.ms_per_image / 1000 / ((time.perf_counter() - start) / 200))

    def _products(self, n: int) -> None:
        x = self._a
        for _ in range(n):
            x = torch.tanh(x @ self._a)

    def __call__(self, images: torch.Tensor, inputs: Any) -> dict[str, torch.Tensor]:
        if self.work == "sleep":
            time.sleep(self.ms_per_image * images.shape[0] / 1000)
        else:
            self._products(self.products_per_image * images.shape[0])
        return self.colour(images, inputs)


def compose(
    setting: dict[str, Any], args: argparse.Namespace, run_dir: str, extra: tuple[str, ...] = ()
) -> Any:
    """The trainer's config for one setting: quickstart, plus the setting, plus benchmark plumbing."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    g = setting["G"]
    overrides = [
        "experiment/rl=quickstart",  # the Hydra group behind psr-rl experiment=quickstart
        f"model={setting['model']}",
        f"run_dir={run_dir}",
        "resume=null",
        f"data.num_subjects=[{setting['refs']}]",
        f"data.image_size={setting['res']}",
        f"data.num_records={args.prompts_per_step * (args.repeats + 1)}",
        "data.heldout=0",
        f"train.resolution={setting['res']}",
        f"train.prompts_per_step={args.prompts_per_step}",
        f"train.group_size={g}",
        f"train.micro_batch_size={args.micro_batch or g}",
        f"train.mode={setting['mode']}",
        f"algo={setting['algo']}",
        f"sampler.num_steps={args.num_steps}",
        "train.eval_every=0",
        "train.grid_every=0",
        "train.checkpoint_every=1000000",
        "train.export_lora=false",
        "requeue_on_preemption=false",
        *extra,
    ]
    if setting["algo"] == "grpo":
        overrides.append(f"algo.beta={setting['beta']}")
    if args.flux_size:
        rank = args.lora_rank or 64
        overrides += ["engine.precision=bf16", f"train.lora.rank={rank}", f"train.lora.alpha={rank}"]
    elif args.lora_rank:
        overrides += [f"train.lora.rank={args.lora_rank}", f"train.lora.alpha={2 * args.lora_rank}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = hydra_compose("rl", overrides=overrides)
    if args.flux_size:
        with open_dict(cfg):
            cfg.model = FULL_SIZE[setting["model"]]
    return cfg


class Phases:
    """Wall time (CUDA-synchronized) and peak CUDA memory of each phase of a step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, list[float]] = {}
        self.peak_mb: dict[str, float] = {}

    def __call__(self, name: str, fn: Any, *a: Any) -> Any:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        out = fn(*a)
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), peak)
        self.ms.setdefault(name, []).append(1000 * (time.perf_counter() - t0))
        return out


def measure(setting: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Set up a trainer for ``setting``, warm up one step, time ``--repeats`` steps."""
    from psr.trainers.rl import RLTrainer

    with tempfile.TemporaryDirectory(prefix="psr_rl_bench_") as run_dir:
        trainer = RLTrainer(compose(setting, args, run_dir))
        trainer.setup()
        try:
            device = trainer.engine.device
            phases = Phases(device)
            skipped = 0
            for step in range(args.repeats + 1):
                if step == 1:  # drop the warm-up step
                    phases = Phases(device)
                trainer.step = step
                records = trainer.batches.next_batch()
                trajs = phases("rollout", trainer.rollout, records, step)
                scores = phases("reward", trainer.score, trajs, records)
                metrics = phases("update", trainer.update, trajs, scores)
                skipped += step > 0 and "train/skipped_update" in metrics
            rec = records[0]
            cond = trainer.policy.condition(rec.prompt, rec.references, setting["res"], setting["res"])
            steps = [sum(t) for t in zip(*phases.ms.values(), strict=True)]
            return {
                **setting,
                "N": cond.num_target_tokens,
                "R": cond.ref_tokens.shape[1],
                **{f"{k}_ms": statistics.median(v) for k, v in phases.ms.items()},
                "step_ms": statistics.median(steps),
                "rollout_mb": phases.peak_mb.get("rollout"),
                "update_mb": phases.peak_mb.get("update"),
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                "skipped": skipped,
            }
        finally:
            trainer.cleanup()


def measure_overlap(
    setting: dict[str, Any], args: argparse.Namespace, ms_per_image: float, mode: str
) -> dict[str, float]:
    """``train()`` for 1 + ``--repeats`` steps with :class:`SlowReward` served as ``mode``; the ``time/*``
    (ms) of the median step (by total time; its own phases, so they add up), read back from
    metrics.jsonl as the trainer logged them."""
    import json

    from psr.trainers.rl import RLTrainer

    extra = (
        "reward._target_=rl_step.SlowReward",
        f"+reward.ms_per_image={ms_per_image}",
        f"+reward.work={args.work}",
        f"train.steps={args.repeats + 1}",
        *OVERLAP_MODES[mode],
    )
    with tempfile.TemporaryDirectory(prefix="psr_rl_bench_") as run_dir:
        trainer = RLTrainer(compose(setting, args, run_dir, extra))
        trainer.setup()
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        steps = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "time/rollout" in r and r["step"] > 1]  # step 1: warm-up
    for r in steps:
        r["time/step"] = r["time/rollout"] + r["time/reward"] + r["time/update"]
    median = sorted(steps, key=lambda r: r["time/step"])[len(steps) // 2]
    return {k: 1000 * median[f"time/{k}"] for k in ("rollout", "reward_compute", "reward", "update", "step")}


def overlap_table(args: argparse.Namespace) -> None:
    """The ``--overlap`` table (see the module docstring)."""
    setting = {
        "model": args.backbones[0],
        "G": args.group_sizes[0],
        "refs": args.refs[0],
        "res": args.resolutions[0],
        "algo": "grpo",
        "mode": "lora",
        "beta": 0.0,
    }
    p, g = args.prompts_per_step, setting["G"]
    calibration = measure_overlap(setting, args, 0.0, "in turn")
    per_image = calibration["rollout"] / (p * g)
    print(
        f"# psr-rl steps with a slow reward beside the rollout: tiny model, P={p} groups of G={g}, {args.num_steps} "
        f"sampler steps, {setting['res']} px, cpu, {torch.get_num_threads()} threads; SlowReward work={args.work} "
        f"at ratio x the rollout's {per_image:.1f} ms per image; the median of {args.repeats} steps after 1 warm-up"
    )
    print(
        f"{'ratio':>5} {'mode':>7} {'rollout ms':>10} {'reward ms':>9} {'waited ms':>9} {'update ms':>9} "
        f"{'step ms':>8} {'ideal ms':>8} {'in turn/step':>12} {'hidden':>6} {'bound':>5}"
    )
    bound = (p - 1) / p
    for ratio in args.reward_ratios:
        in_turn_step = None
        for mode in OVERLAP_MODES:
            r = measure_overlap(setting, args, ratio * per_image, mode)
            in_turn_step = in_turn_step or r["step"]
            smaller = min(r["rollout"], r["reward_compute"])
            hidden = (r["rollout"] + r["reward_compute"] + r["update"] - r["step"]) / smaller
            ideal = max(r["rollout"], r["reward_compute"]) + r["update"]
            print(
                f"{ratio:>5g} {mode:>7} {r['rollout']:>10.1f} {r['reward_compute']:>9.1f} {r['reward']:>9.1f} "
                f"{r['update']:>9.1f} {r['step']:>8.1f} {ideal:>8.1f} {in_turn_step / r['step']:>11.2f}x "
                f"{hidden:>6.0%} {bound:>5.0%}",
                flush=True,
            )


def settings(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """``(varied axis, setting)`` rows: one axis at a time around the base, or the full grid."""
    lists = {
        "model": args.backbones,
        "G": args.group_sizes,
        "refs": args.refs,
        "res": args.resolutions,
        "algo": args.algos,
        "mode": args.modes,
        "beta": args.betas,
    }
    if args.grid:
        rows = [dict(zip(AXES, values, strict=True)) for values in itertools.product(*lists.values())]
        rows = [r for r in rows if r["algo"] == "grpo" or r["beta"] == lists["beta"][0]]  # DPO: no GRPO beta
        return [("grid", r) for r in rows]
    base = {k: v[0] for k, v in lists.items()}
    out = [("base", base)]
    for axis, values in lists.items():
        if axis == "beta" and base["algo"] != "grpo":
            continue
        ordered = sorted(values) if axis in ("G", "refs", "res", "beta") else values
        out += [(axis, {**base, axis: v}) for v in ordered if v != base[axis]]
    return out


def fmt_mb(mb: float | None) -> str:
    return "n/a" if mb is None else f"{mb:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux-size", action="store_true", help="FLUX.1-size random weights (needs CUDA)")
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=list(FULL_SIZE),
        default=list(FULL_SIZE),
        help="model= configs (tiny: FLUX.1 Kontext); the first is the base",
    )
    p.add_argument("--group-sizes", type=int, nargs="+", default=None, help="G; the first is the base")
    p.add_argument("--refs", type=int, nargs="+", default=[2, 1, 4], help="references per prompt")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="target side in pixels")
    p.add_argument("--algos", nargs="+", choices=["grpo", "dpo"], default=["grpo", "dpo"])
    p.add_argument("--modes", nargs="+", choices=["lora", "full"], default=None)
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.01], help="GRPO KL weight")
    p.add_argument("--grid", action="store_true", help="every combination, not one axis at a time")
    p.add_argument(
        "--prompts-per-step", type=int, default=None, help="P groups per step (default 1; 8 with --overlap)"
    )
    p.add_argument("--micro-batch", type=int, default=None, help="samples per update forward (default G)")
    p.add_argument(
        "--num-steps", type=int, default=None, help="K sampler steps (default 28 with --flux-size, else 4)"
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="default 64 with --flux-size, else quickstart's 8 (alpha 2x rank)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--overlap", action="store_true", help="the reward-beside-the-rollout table instead")
    p.add_argument(
        "--reward-ratios",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0],
        help="--overlap: the slow reward's time per image, in multiples of the rollout's",
    )
    p.add_argument(
        "--work", choices=["sleep", "compute"], default="sleep", help="--overlap: how the reward is slow"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: see benchmarks/rewards.py on busy machines)",
    )
    args = p.parse_args()
    if args.flux_size and not torch.cuda.is_available():
        raise SystemExit(
            "rl_step.py: --flux-size builds a FLUX.1-size model (12B parameters, ~24 GB in bf16) and needs a "
            "CUDA GPU; none is available here. Run without --flux-size for the tiny model."
        )
    args.group_sizes = args.group_sizes or ([6, 2] if args.flux_size else [4, 2, 8])
    args.resolutions = args.resolutions or ([512, 1024] if args.flux_size else [32, 64])
    args.modes = args.modes or (["lora"] if args.flux_size else ["lora", "full"])
    args.num_steps = args.num_steps or (28 if args.flux_size else 4)
    args.prompts_per_step = args.prompts_per_step or (8 if args.overlap else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the tiny builders' dtype-cast notice, once per setting
    if args.overlap:
        overlap_table(args)
        return
    rows = settings(args)
    model = "published-size random" if args.flux_size else "tiny"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"# one psr-rl step: {model} model, {args.num_steps} sampler steps, P={args.prompts_per_step}, "
        f"micro-batch {args.micro_batch or 'G'}, colour reward, {device}, {torch.get_num_threads()} threads, "
        f"{len(rows)} settings, median of {args.repeats} after 1 warm-up"
    )
    print(
        f"{'varied':>6} {'model':>26} {'G':>3} {'refs':>4} {'res':>5} {'N':>5} {'R':>5} {'algo':>4} {'mode':>4} {'beta':>5} "
        f"{'rollout ms':>10} {'reward ms':>9} {'update ms':>9} {'step ms':>8} {'roll MB':>7} {'upd MB':>7} "
        f"{'RSS MB':>7}"
    )
    for axis, setting in rows:
        r = measure(setting, args)
        beta = f"{r['beta']:g}" if r["algo"] == "grpo" else "-"
        note = (
            f"  ({r['skipped']} of {args.repeats} updates skipped: zero-variance rewards)"
            if r["skipped"]
            else ""
        )
        print(
            f"{axis:>6} {r['model']:>26} {r['G']:>3} {r['refs']:>4} {r['res']:>5} {r['N']:>5} {r['R']:>5} {r['algo']:>4} "
            f"{r['mode']:>4} {beta:>5} {r['rollout_ms']:>10.1f} {r['reward_ms']:>9.1f} {r['update_ms']:>9.1f} "
            f"{r['step_ms']:>8.1f} {fmt_mb(r['rollout_mb']):>7} {fmt_mb(r['update_mb']):>7} {r['rss_mb']:>7.0f}"
            f"{note}",
            flush=True,
        )


if __name__ == "__main__":
    main()
