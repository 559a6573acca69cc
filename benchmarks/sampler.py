"""Time and memory of group rollouts vs backbone, references, resolution, SDE vs ODE and group size; and
what conditioning once per group (prompt cache + references encoded once) saves over per-sample
conditioning.

Rows per backbone (``--backbones``, default all three): FLUX.1 Kontext (``FlowPolicy``), FLUX.2 klein
(``Flux2KleinPolicy``: klein-base, true CFG at 4.0, so two branches per velocity) and
Qwen-Image-Edit-Plus (``QwenImageEditPolicy``: true CFG at 4.0, two forwards per velocity). Qwen has no
prompt cache (the prompt is encoded together with the references), so its "cached" column repeats
the cold one.

Table 1, per (backbone, resolution, references, sampler method, group size G): target tokens N, reference tokens
R, median time of one ``rollout`` of G samples (K steps + VAE decode; conditioning excluded, see table
2), per sample, the bytes of the returned Trajectory (latents ``[G, K+1, N, C]`` fp32, log-probs,
images: what an RL step keeps per group), and on CUDA the peak memory allocated during the rollout.

Table 2, per (references, G) at the first resolution: ``condition()`` with an empty prompt cache
(text encoders + reference VAE) and with the prompt cached (references only); then one group of G
samples three ways: conditioned once and rolled out as one batch (what ``psr-rl`` / ``psr-eval``
do), conditioned per sample (G cold ``condition()`` calls) but rolled out as one batch, and fully
per sample (G x cold condition + rollout of 1).

Table 3 (``--vs-pipeline``, alone): psr's cold ``condition`` + ODE ``rollout`` against diffusers'
``FluxKontextPipeline`` generating the same G images (same components, one reference, the same
initial latents) on a FLUX.1 Kontext transformer wide enough to be compute-bound on a CPU (44M
parameters), with the time inside the transformer, text encoders and VAE per side.

    python benchmarks/sampler.py                         # the tiny backbones on the CPU (~1 min each)
    python benchmarks/sampler.py --vs-pipeline --threads 1 --repeats 6   # table 3 (~2 min)
    python benchmarks/sampler.py --full-size --resolutions 512 1024 --group-sizes 1 6 --num-steps 28
    python benchmarks/sampler.py --full-size --backbones flux2_klein --num-steps 50   # one backbone

``--full-size`` builds random weights at each backbone's published size, bf16, on a CUDA GPU:
FLUX.1 Kontext (``sft_step.flux_size_policy``: 19 + 38 blocks, 3072 wide, the 16-channel FLUX VAE),
FLUX.2 klein 4B (:func:`klein_size_policy`: 5 + 20 blocks, 3072 wide, the 32-channel FLUX.2 VAE) and
Qwen-Image-Edit (:func:`qwen_image_edit_size_policy`: 60 blocks, 3072 wide, the Qwen-Image VAE), each
with toy text encoders of the right output widths (table 1 excludes conditioning; table 2's
conditioning times are the toy encoders'). ``--flux-size`` is ``--full-size --backbones flux_kontext``.
Nothing is downloaded. Numbers are for comparison between rows of one run; the tiny models are too
small for their timings to predict a real one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

METHODS = ("ode", "flow_grpo", "dance", "cps")
BACKBONES = ("flux_kontext", "flux2_klein", "qwen_image_edit_plus")


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


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (a 20B transformer in fp32 would need 80 GB first)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def klein_size_policy(device: str, gradient_checkpointing: bool = False) -> Any:
    """FLUX.2 klein-base 4B-size random weights, bf16: the transformer (5 double + 20 single blocks,
    24 heads x 128, Qwen3-4B's 3 x 2560 = 7680-wide text input), the FLUX.2 VAE (32 latent channels,
    diffusers' defaults) and a 3-layer Qwen3 of width 2560 (its three hidden states are concatenated
    as the real model's layers 9, 18, 27); true CFG at 4.0 as klein-base."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from psr.models.flux2_klein import Flux2KleinPolicy, tiny_flux2_klein_components

    comps: dict[str, Any] = tiny_flux2_klein_components(0, fitted_vae=False)
    tokenizer = comps["tokenizer"]
    with torch.device(device), default_dtype(torch.bfloat16):
        comps["transformer"] = Flux2Transformer2DModel(
            num_layers=5,
            num_single_layers=20,
            num_attention_heads=24,
            joint_attention_dim=7680,
            guidance_embeds=False,
        )
        comps["vae"] = AutoencoderKLFlux2()
        comps["text_encoder"] = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=2560,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=20,
                num_key_value_heads=4,
                head_dim=128,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    for name in ("transformer", "vae", "text_encoder"):
        comps[name].requires_grad_(False).eval()
    return Flux2KleinPolicy(
        **comps,
        is_distilled=False,
        guidance_scale=4.0,
        max_sequence_length=512,
        text_encoder_out_layers=(1, 2, 3),
        gradient_checkpointing=gradient_checkpointing,
    )


def qwen_image_edit_size_policy(device: str, gradient_checkpointing: bool = False) -> Any:
    """Qwen-Image-Edit-size random weights, bf16: the transformer (60 blocks, 24 heads x 128,
    3584-wide text input; diffusers' defaults), the Qwen-Image VAE (diffusers' defaults) and a 2-layer
    Qwen2.5-VL of width 3584 with the tiny processor; references at the pipeline's areas (384^2 seen,
    1024^2 encoded), true CFG at 4.0."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from psr.models.qwen_image_edit import QwenImageEditPolicy, tiny_qwen_image_edit_plus_components
    from rewards.testing import tiny_qwen_vl

    comps: dict[str, Any] = tiny_qwen_image_edit_plus_components(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        comps["transformer"] = QwenImageTransformer2DModel()
        comps["vae"] = AutoencoderKLQwenImage()
        comps["text_encoder"], comps["processor"] = tiny_qwen_vl("qwen2_5_vl", hidden_size=3584)
    comps["tokenizer"] = comps["processor"].tokenizer
    for name in ("transformer", "vae", "text_encoder"):
        comps[name].requires_grad_(False).eval()
    return QwenImageEditPolicy(
        **comps,
        true_cfg_scale=4.0,
        condition_area=384 * 384,
        reference_area=1024 * 1024,
        gradient_checkpointing=gradient_checkpointing,
    )


def build_policy(backbone: str, args: argparse.Namespace) -> Any:
    if args.full_size:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sft_step import flux_size_policy

        full: dict[str, Callable[[], Any]] = {
            "flux_kontext": partial(flux_size_policy, args.device, gradient_checkpointing=False),
            "flux2_klein": partial(klein_size_policy, args.device),
            "qwen_image_edit_plus": partial(qwen_image_edit_size_policy, args.device),
        }
        return full[backbone]()
    from psr.models.builders import tiny_flux_kontext
    from psr.models.flux2_klein import tiny_flux2_klein
    from psr.models.qwen_image_edit import tiny_qwen_image_edit_plus

    tiny: dict[str, Callable[..., Any]] = {
        "flux_kontext": tiny_flux_kontext,
        "flux2_klein": tiny_flux2_klein,
        "qwen_image_edit_plus": tiny_qwen_image_edit_plus,  # references at 64 x 64 (R = 16 each)
    }
    return tiny[backbone](0, device=args.device)


def inputs(n_refs: int, res: int, seed: int = 0) -> tuple[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return "a dog and a cat in a garden", [torch.rand(3, res, res, generator=g) for _ in range(n_refs)]


TABLE_1 = (
    f"{'backbone':>20} {'res':>5} {'refs':>4} {'N':>6} {'R':>6} {'method':>9} {'G':>3} {'rollout ms':>11} "
    f"{'ms/sample':>10} {'traj MB':>8} {'peak MB':>8}"
)


def rollout_table(policy: Any, backbone: str, args: argparse.Namespace) -> None:
    from psr.sampling.rollout import rollout

    device = torch.device(args.device)
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
                        f"{backbone:>20} {res:>5} {n_refs:>4} {cond.num_target_tokens:>6} {cond.ref_tokens.shape[1]:>6} "
                        f"{method:>9} {g:>3} {ms:>11.1f} {ms / g:>10.1f} {trajectory_bytes(traj) / 2**20:>8.2f} "
                        f"{peak:>8.0f}",
                        flush=True,
                    )
                    del traj


TABLE_2 = (
    f"{'backbone':>20} {'refs':>4} {'G':>3} {'cold ms':>8} {'cached ms':>9} {'once ms':>9} {'per-smp ms':>10} "
    f"{'naive ms':>9} {'naive/once':>10}"
)


def cache_table(policy: Any, backbone: str, args: argparse.Namespace) -> list[str]:
    """Table 2's rows for one backbone (printed after every backbone's table 1)."""
    from psr.sampling.rollout import rollout

    device = torch.device(args.device)
    res = args.resolutions[0]
    k = args.num_steps
    rows = []

    def cold_condition(prompt: str, refs: list[torch.Tensor]) -> Any:
        cache = getattr(policy, "_prompt_cache", None)  # Qwen has none: every condition() is cold
        if cache is not None:
            cache.clear()  # what a policy without the prompt cache would compute
        return policy.condition(prompt, refs, res, res)

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
            rows.append(
                f"{backbone:>20} {n_refs:>4} {g:>3} {cold:>8.1f} {warm:>9.1f} {t_once:>9.1f} {t_cond:>10.1f} "
                f"{t_naive:>9.1f} {t_naive / t_once:>9.1f}x"
            )
    return rows


def wide_flux_kontext_components(seed: int = 0) -> dict[str, Any]:
    """The tiny FLUX.1 Kontext components with a transformer wide enough to be compute-bound on a CPU:
    2 double + 6 single blocks, 4 heads x 128 (512 wide, RoPE axes (16, 56, 56) as FLUX.1), 44M
    parameters; the tiny text encoders and VAE, fp32."""
    from diffusers import FluxTransformer2DModel

    from psr.models.builders import tiny_flux_kontext_components

    comps: dict[str, Any] = tiny_flux_kontext_components(seed)
    torch.manual_seed(seed)
    transformer: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=6,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    comps["transformer"] = transformer.requires_grad_(False).eval()
    return comps


class PhaseTimer:
    """Wall time spent inside wrapped callables, summed per phase name (the breakdown of table 3)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, float] = {}

    def wrap(self, obj: Any, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.ms[phase] = self.ms.get(phase, 0.0) + 1000 * (time.perf_counter() - t0)

        setattr(obj, attr, call)  # an instance attribute: module.__call__ finds it as self.forward


PHASES = ("transformer", "text encoders", "vae encode", "vae decode")
TABLE_3 = (
    f"{'':>9} {'res':>4} {'G':>2} {'K':>2} {'total ms':>9} "
    + " ".join(f"{p:>13}" for p in PHASES)
    + f" {'rest ms':>8} {'total ratio':>11} {'max |diff|':>10}"
)


def pipeline_table(args: argparse.Namespace) -> None:
    """Table 3: psr's cold ``condition`` + ODE ``rollout`` against ``FluxKontextPipeline`` on the same
    components, generating the same G images (one reference, the same initial latents), timed
    alternately (ABBA order) in one process. Phases are the time inside the wrapped modules (both
    sides call the same module objects); ``rest`` is everything else (Python, per-step tensor
    bookkeeping, the Euler step, pre/post-processing)."""
    from diffusers import FluxKontextPipeline

    from psr.models.policy import FlowPolicy
    from psr.sampling.rollout import initial_noise, rollout

    device = torch.device(args.device)
    comps = wide_flux_kontext_components(0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        comps[name].to(device)
    policy = FlowPolicy(**comps, max_sequence_length=32).eval()
    pipe: Any = FluxKontextPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    timer = PhaseTimer(device)
    timer.wrap(comps["transformer"], "forward", "transformer")
    timer.wrap(comps["text_encoder"], "forward", "text encoders")
    timer.wrap(comps["text_encoder_2"], "forward", "text encoders")
    timer.wrap(comps["vae"], "encode", "vae encode")
    timer.wrap(comps["vae"], "decode", "vae decode")
    n_params = sum(p.numel() for p in comps["transformer"].parameters()) / 1e6
    k = args.num_steps
    print(
        f"\n# psr (cold condition() + rollout(method=ode)) vs diffusers FluxKontextPipeline, same components "
        f"(transformer {n_params:.1f}M parameters, fp32), same G images from the same latents, 1 reference, "
        f"{k} steps, {args.device}, {torch.get_num_threads()} threads; median of {args.repeats} alternating "
        f"runs after 1 warm-up each; phases: time inside the module calls"
    )
    print(TABLE_3)
    for res in args.resolutions:
        prompt, refs = inputs(1, res)
        for g in args.group_sizes:
            x0 = initial_noise(
                policy, policy.condition(prompt, refs, res, res), g, torch.Generator(device).manual_seed(0)
            )

            def ours(
                g: int = g, res: int = res, prompt: str = prompt, refs: list = refs, x0: torch.Tensor = x0
            ) -> torch.Tensor:
                policy._prompt_cache.clear()  # the pipeline encodes the prompt on every call
                cond = policy.condition(prompt, refs, res, res)
                return rollout(policy, cond, g, num_steps=k, method="ode", latents=x0).images

            def theirs(
                g: int = g, res: int = res, prompt: str = prompt, refs: list = refs, x0: torch.Tensor = x0
            ) -> torch.Tensor:
                return pipe(
                    image=refs[0][None],
                    prompt=prompt,
                    height=res,
                    width=res,
                    num_inference_steps=k,
                    guidance_scale=2.5,
                    latents=x0.clone(),
                    max_area=res * res,
                    _auto_resize=False,
                    output_type="pt",
                    max_sequence_length=32,
                    num_images_per_prompt=g,
                ).images

            runs: dict[str, list[dict[str, float]]] = {"psr": [], "diffusers": []}
            images = {"psr": ours(), "diffusers": theirs()}  # warm-up
            for r in range(args.repeats):
                order = [("psr", ours), ("diffusers", theirs)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    timer.ms = {}
                    sync(device)
                    t0 = time.perf_counter()
                    images[name] = fn()
                    sync(device)
                    row = {"total": 1000 * (time.perf_counter() - t0), **timer.ms}
                    row["rest"] = row["total"] - sum(timer.ms.values())
                    runs[name].append(row)
            diff = (images["psr"] - images["diffusers"].float()).abs().max().item()
            med = {
                name: {
                    c: statistics.median(row.get(c, 0.0) for row in rows) for c in ("total", *PHASES, "rest")
                }
                for name, rows in runs.items()
            }
            for name in ("psr", "diffusers"):
                m = med[name]
                print(
                    f"{name:>9} {res:>4} {g:>2} {k:>2} {m['total']:>9.1f} "
                    + " ".join(f"{m[p]:>13.1f}" for p in PHASES)
                    + f" {m['rest']:>8.1f} {m['total'] / med['diffusers']['total']:>10.3f}x {diff:>10.1e}",
                    flush=True,
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=BACKBONES,
        default=list(BACKBONES),
        help="rows per backbone, in this order",
    )
    p.add_argument(
        "--full-size",
        action="store_true",
        help="random weights at each backbone's published size (needs CUDA)",
    )
    p.add_argument("--flux-size", action="store_true", help="--full-size --backbones flux_kontext")
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
    p.add_argument("--num-steps", type=int, default=None, help="K (default 28 with --full-size, else 10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-cache-table", action="store_true", help="skip table 2")
    p.add_argument(
        "--vs-pipeline",
        action="store_true",
        help="only table 3: psr's ODE rollout vs diffusers' FluxKontextPipeline on a 44M-parameter "
        "FLUX.1 Kontext (defaults 128 px, G=4, 8 steps)",
    )
    args = p.parse_args()
    if args.vs_pipeline:
        args.resolutions = args.resolutions or [128]
        args.group_sizes = args.group_sizes or [4]
        args.num_steps = args.num_steps or 8
        if args.threads:
            torch.set_num_threads(args.threads)
        pipeline_table(args)
        return
    if args.flux_size:
        args.full_size, args.backbones = True, ["flux_kontext"]
    if args.full_size and not (torch.cuda.is_available() and args.device.startswith("cuda")):
        raise SystemExit(
            "sampler.py: --full-size / --flux-size build full-size models (FLUX.1 Kontext 12B, FLUX.2 klein 4B, "
            "Qwen-Image-Edit 20B parameters; 8-41 GB in bf16) and need a CUDA GPU; none is available here (or "
            "--device is not cuda). Run without them for the tiny models."
        )
    args.resolutions = args.resolutions or ([512, 1024] if args.full_size else [64, 128])
    args.group_sizes = args.group_sizes or ([1, 6] if args.full_size else [1, 4, 8])
    args.num_steps = args.num_steps or (28 if args.full_size else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = "full-size random" if args.full_size else "tiny"
    print(
        f"# rollout: {model} models, {args.num_steps} steps, {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}; SDE methods noise level 0.7 on every step"
    )
    print(TABLE_1, flush=True)
    cache_rows: list[str] = []
    for backbone in args.backbones:
        policy = build_policy(backbone, args).eval()
        rollout_table(policy, backbone, args)
        if not args.no_cache_table:
            cache_rows += cache_table(policy, backbone, args)
        del policy
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if cache_rows:
        k, res = args.num_steps, args.resolutions[0]
        print(
            f"\n# conditioning at {res} px, ODE, {k} steps: condition() cold / prompt cached; one group of G samples "
            f"conditioned once (batched rollout) | per sample (batched rollout) | per sample (rollout of 1 each)"
        )
        print(TABLE_2)
        print("\n".join(cache_rows))


if __name__ == "__main__":
    main()
