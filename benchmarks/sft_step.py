"""Time and memory of one SFT step vs the number of references and the resolution.

One step is what ``psr-sft`` does per micro-batch: text + reference conditioning, VAE encoding of
the target, the flow-matching loss on the target tokens (:mod:`psr.objectives.flow_matching`),
backward, and the engine's optimizer step. Printed per (resolution, references): target tokens N,
reference tokens R, median step time, and memory: on CUDA the peak allocated during the step; on
the CPU the bytes of activations saved for backward (the part that grows with N + R; measured
with autograd's saved-tensor hooks, one count per storage).

    python benchmarks/sft_step.py                        # tiny model on the CPU (seconds)
    python benchmarks/sft_step.py --flux-size --device cuda --resolutions 512 1024 --refs 0 1 2 3 4

``--flux-size`` builds FLUX.1-size random weights (19 double + 38 single blocks, 3072 wide, bf16;
the FLUX VAE with 16 latent channels) with toy text encoders that produce the right widths
(T5 4096, CLIP pooled 768): text embeddings are computed once per prompt and cached in training,
so their size does not enter the step. Needs a GPU with ~80 GB for full fine-tuning at 1024;
LoRA (the default, rank 512 as in PSR) fits in far less. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch


def flux_size_policy(device: str, gradient_checkpointing: bool) -> Any:
    """A FLUX.1-size random policy (see the module docstring); bf16 transformer and VAE."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from psr.models.builders import tiny_flux_kontext_components
    from psr.models.policy import FlowPolicy

    comps = tiny_flux_kontext_components(0, fitted_vae=False)
    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)  # FLUX.1 defaults
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).to(torch.bfloat16)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=12,
                projection_dim=768,
                bos_token_id=49406,
                eos_token_id=49407,
            )
        ).to(torch.bfloat16)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(comps["tokenizer_2"]),
                d_model=4096,
                d_kv=64,
                d_ff=64,
                num_layers=1,
                num_heads=4,
            )
        ).to(torch.bfloat16)
    comps.update(transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        comps[name].requires_grad_(False).eval()
    return FlowPolicy(**comps, max_sequence_length=512, gradient_checkpointing=gradient_checkpointing)


class SavedBytes:
    """Bytes of distinct storages autograd saves for backward inside the block."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def step(
    policy: Any,
    engine: Any,
    objective: Any,
    prompts: list[str],
    refs: list[list[torch.Tensor]],
    targets: torch.Tensor,
    res: int,
) -> int:
    """One SFT step as the trainer takes it; returns the bytes of activations saved for backward."""
    from psr.models.policy import stack_conditionings

    device = policy.device
    conds = [policy.condition(p, r, res, res) for p, r in zip(prompts, refs, strict=True)]
    x0 = policy.encode_images(targets.to(device))
    gen = torch.Generator(device).manual_seed(1)
    sigmas = objective.sample(len(prompts), x0.shape[1], policy.scheduler_config, gen, device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    with SavedBytes() as saved:
        for idx, cond in stack_conditionings(conds):
            with engine.autocast():
                loss, _ = objective(policy, x0[idx], cond, sigmas=sigmas[idx], noise=noise[idx])
            engine.backward(loss * len(idx) / len(prompts))
    engine.step()
    return saved.total


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from psr.engine import TorchEngine
    from psr.models.builders import tiny_flux_kontext
    from psr.models.lora import add_lora
    from psr.objectives.flow_matching import FlowMatchingLoss

    device = torch.device(args.device)
    if args.flux_size:
        policy = flux_size_policy(args.device, args.gradient_checkpointing)
    else:
        policy = tiny_flux_kontext(0, device=args.device, gradient_checkpointing=args.gradient_checkpointing)
    if args.mode == "lora":
        params = add_lora(policy.transformer, rank=args.lora_rank, alpha=args.lora_rank)
    else:
        policy.transformer.requires_grad_(True)
        params = list(policy.transformer.parameters())
    engine = TorchEngine(precision=args.precision, device=args.device)
    engine.setup(policy.transformer, params, lr=1e-4, grad_clip=1.0)
    objective = FlowMatchingLoss()
    policy.eval()
    policy.transformer.train()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for res in args.resolutions:
        for n_refs in args.refs:
            targets = torch.rand(args.batch, 3, res, res, generator=gen)
            refs = [
                [torch.rand(3, res, res, generator=gen) for _ in range(n_refs)] for _ in range(args.batch)
            ]
            prompts = [f"subject {i} and friends in a garden" for i in range(args.batch)]

            step(
                policy, engine, objective, prompts, refs, targets, res
            )  # warm-up (allocator, kernels, prompt cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                saved = step(policy, engine, objective, prompts, refs, targets, res)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            n_tok = (res // policy.multiple) ** 2
            row = {
                "res": res,
                "refs": n_refs,
                "N": n_tok,
                "R": n_refs * n_tok,
                "ms": 1000 * statistics.median(times),
                "saved_MB": saved / 2**20,
                "peak_MB": torch.cuda.max_memory_allocated() / 2**20
                if device.type == "cuda"
                else float("nan"),
            }
            rows.append(row)
            print(
                f"{res:>5} {n_refs:>4} {row['N']:>6} {row['R']:>6} {row['ms']:>10.1f} {row['saved_MB']:>10.1f} "
                f"{row['peak_MB']:>10.0f}",
                flush=True,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux-size", action="store_true", help="FLUX.1-size random weights (GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="target side in pixels")
    p.add_argument("--refs", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="references per sample")
    p.add_argument("--batch", type=int, default=1, help="samples per micro-batch")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--lora-rank", type=int, default=None, help="default: 512 with --flux-size (PSR), else 16")
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 with --flux-size"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    args.resolutions = args.resolutions or ([512, 1024] if args.flux_size else [64, 128])
    args.lora_rank = args.lora_rank or (512 if args.flux_size else 16)
    args.precision = args.precision or ("bf16" if args.flux_size else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = "FLUX.1-size random" if args.flux_size else "tiny"
    print(
        f"# one SFT step: {model} model, {args.mode}"
        f"{f' rank {args.lora_rank}' if args.mode == 'lora' else ''}, batch {args.batch}, {args.precision}, "
        f"grad ckpt {args.gradient_checkpointing}, {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"{'res':>5} {'refs':>4} {'N':>6} {'R':>6} {'step ms':>10} {'saved MB':>10} {'peak MB':>10}")
    run(args)


if __name__ == "__main__":
    main()
