"""Time and memory of group rollouts vs references, resolution, SDE vs ODE and group size; and what
conditioning once per group (prompt cache + references encoded once) saves over per-sample conditioning.

Table 1, per (resolution, references, sampler method, group size G): target tokens N, reference tokens
R, median time of one ``rollout`` of G samples (K steps + VAE decode; conditioning excluded, see table
2), per sample, the bytes of the returned Trajectory (latents ``[G, K+1, N, C]`` fp32, log-probs,
images: what an RL step keeps per group), and on CUDA the peak memory allocated during the rollout.

Table 2, per (references, G) at the first resolution: ``condition()`` with an empty prompt cache
(text encoders + reference VAE) and with the prompt cached (references only); then one group of G
samples three ways: conditioned once and rolled out as one batch (what ``psr-rl`` / ``psr-eval``
do), conditioned per sample (G cold ``condition()`` calls) but rolled out as one batch, and fully
per sample (G x cold condition + rollout of 1).

    python benchmarks/sampler.py                         # tiny model on the CPU (~1 min)
    python benchmarks/sampler.py --flux-size --resolutions 512 1024 --group-sizes 1 6 --num-steps 28

``--flux-size`` builds FLUX.1-size random weights (see ``benchmarks/sft_step.py``: 19 + 38 blocks,
3072 wide, bf16, the 16-channel FLUX VAE, toy text encoders of the right widths) and needs a CUDA
GPU. Nothing is downloaded. Numbers are for comparison between rows; the tiny model is too small
for its timings to predict a real one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

METHODS = ("ode", "flow_grpo", "dance", "cps")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median milliseconds of ``repeats`` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), out


def trajectory_bytes(traj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (traj.latents, traj.log_probs, traj.images))


def build_policy(args: argparse.Namespace) -> Any:
    if args.flux_size:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sft_step import flux_size_policy

        return flux_size_policy(args.device, gradient_checkpointing=False)
    from psr.models.builders import tiny_flux_kontext

    return tiny_flux_kontext(0, device=args.device)


def inputs(n_refs: int, res: int, seed: int = 0) -> tuple[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return "a dog and a cat in a garden", [torch.rand(3, res, res, generator=g) for _ in range(n_refs)]


def rollout_table(policy: Any, args: argparse.Namespace) -> None:
    from psr.sampling.rollout import rollout

    device = torch.device(args.device)
    print(
        f"{'res':>5} {'refs':>4} {'N':>6} {'R':>6} {'method':>9} {'G':>3} {'rollout ms':>11} {'ms/sample':>10} "
        f"{'traj MB':>8} {'peak MB':>8}"
    )
    for res in args.resolutions:
        for n_refs in args.refs:
            prompt, refs = inputs(n_refs, res)
            cond = policy.condition(prompt, refs, res, res)
            for method in args.methods:
                for g in args.group_sizes:
                    gen = torch.Generator(device)

                    def run(
                        g: int = g, method: str = method, gen: torch.Generator = gen, cond: Any = cond
                    ) -> Any:
                        gen.manual_seed(0)
                        return rollout(
                            policy,
                            cond,
                            g,
                            num_steps=args.num_steps,
                            method=method,
                            noise_level=0.7,
                            generator=gen,
                        )

                    if device.type == "cuda":
                        run()
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    ms, traj = timed(run, args.repeats, device)
                    peak = (
                        torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
                    )
                    print(
                        f"{res:>5} {n_refs:>4} {cond.num_target_tokens:>6} {cond.ref_tokens.shape[1]:>6} "
                        f"{method:>9} {g:>3} {ms:>11.1f} {ms / g:>10.1f} {trajectory_bytes(traj) / 2**20:>8.2f} "
                        f"{peak:>8.0f}",
                        flush=True,
                    )
                    del traj


def cache_table(policy: Any, args: argparse.Namespace) -> None:
    from psr.sampling.rollout import rollout

    device = torch.device(args.device)
    res = args.resolutions[0]
    k = args.num_steps

    def cold_condition(prompt: str, refs: list[torch.Tensor]) -> Any:
        policy._prompt_cache.clear()  # what a policy without the prompt cache would compute
        return policy.condition(prompt, refs, res, res)

    print(
        f"\n# conditioning at {res} px, ODE, {k} steps: condition() cold / prompt cached; one group of G samples "
        f"conditioned once (batched rollout) | per sample (batched rollout) | per sample (rollout of 1 each)"
    )
    print(
        f"{'refs':>4} {'G':>3} {'cold ms':>8} {'cached ms':>9} {'once ms':>9} {'per-smp ms':>10} "
        f"{'naive ms':>9} {'naive/once':>10}"
    )
    for n_refs in args.refs:
        prompt, refs = inputs(n_refs, res)
        cold, _ = timed(partial(cold_condition, prompt, refs), args.repeats, device)
        policy.condition(prompt, refs, res, res)
        warm, _ = timed(partial(policy.condition, prompt, refs, res, res), args.repeats, device)
        for g in args.group_sizes:

            def once(g: int = g, prompt: str = prompt, refs: list = refs) -> Any:
                cond = cold_condition(prompt, refs)
                return rollout(policy, cond, g, num_steps=k, method="ode")

            def per_sample_cond(g: int = g, prompt: str = prompt, refs: list = refs) -> Any:
                conds = [cold_condition(prompt, refs) for _ in range(g)]
                return rollout(policy, conds[0], g, num_steps=k, method="ode")

            def naive(g: int = g, prompt: str = prompt, refs: list = refs) -> Any:
                return [
                    rollout(policy, cold_condition(prompt, refs), 1, num_steps=k, method="ode")
                    for _ in range(g)
                ]

            t_once, _ = timed(once, args.repeats, device)
            t_cond, _ = timed(per_sample_cond, args.repeats, device)
            t_naive, _ = timed(naive, args.repeats, device)
            print(
                f"{n_refs:>4} {g:>3} {cold:>8.1f} {warm:>9.1f} {t_once:>9.1f} {t_cond:>10.1f} {t_naive:>9.1f} "
                f"{t_naive / t_once:>9.1f}x",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux-size", action="store_true", help="FLUX.1-size random weights (needs CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="target side in pixels")
    p.add_argument("--refs", type=int, nargs="+", default=[0, 1, 2, 4], help="references per prompt")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["ode", "flow_grpo"],
        help="sampler methods (sampler.method)",
    )
    p.add_argument("--group-sizes", type=int, nargs="+", default=None, help="samples per group G")
    p.add_argument("--num-steps", type=int, default=None, help="K (default 28 with --flux-size, else 10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-cache-table", action="store_true", help="skip table 2")
    args = p.parse_args()
    if args.flux_size and not (torch.cuda.is_available() and args.device.startswith("cuda")):
        raise SystemExit(
            "sampler.py: --flux-size builds a FLUX.1-size model (12B parameters, ~24 GB in bf16) and needs a "
            "CUDA GPU; none is available here (or --device is not cuda). Run without --flux-size for the tiny model."
        )
    args.resolutions = args.resolutions or ([512, 1024] if args.flux_size else [64, 128])
    args.group_sizes = args.group_sizes or ([1, 6] if args.flux_size else [1, 4, 8])
    args.num_steps = args.num_steps or (28 if args.flux_size else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = build_policy(args)
    policy.eval()
    model = "FLUX.1-size random" if args.flux_size else "tiny"
    print(
        f"# rollout: {model} model, {policy.dtype}, {args.num_steps} steps, {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}; SDE methods noise level 0.7 on every step"
    )
    rollout_table(policy, args)
    if not args.no_cache_table:
        cache_table(policy, args)


if __name__ == "__main__":
    main()
