"""The VLM judge (rewards/judge.py): throughput and how the logit mode ranks images against the decoded mode.

1. Images/second of the judge in this process and through ``transformers serve`` (started here on a
   free local port, same model folder), decoded and logit mode, batch 1 / 8 / 32 (64 x 64 images).
   ``transformers serve`` ignores ``logprobs``, so the served logit mode is not measured here (vLLM
   or SGLang serve it).
2. Ranking agreement: Spearman's rho between the logit mode's expected score and the decoded mode's
   parsed score on the same samples.

Without ``--path`` both use a tiny random Qwen2.5-VL (rewards/testing.py): throughput then measures
the judge's own overhead (PNG encoding, processor, HTTP) more than model compute, and for the ranking
its generation is restricted to the score tokens (``suppress_tokens``), prefilled with "[Score]: "
and one token long, so that the decoded score is the most likely digit and parses; the rho only
demonstrates the measurement. With a real
judge, the decoded mode is PSRBench's (thought, then score):

    python benchmarks/judge.py --path /models/Qwen2.5-VL-7B-Instruct --device cuda --dtype bfloat16 \
        --pairs pairs.jsonl --max-new-tokens 512        # pairs.jsonl: {"image": path, "prompt": text}

Usage: python benchmarks/judge.py [--no-serve] [--batches 1 8 32] [--samples 48] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# run as a script, this file's folder comes first on sys.path and its name would shadow packages
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from rewards.base import RewardInputs  # noqa: E402
from rewards.judge import VLMJudge  # noqa: E402

PROMPTS = ["a dog wearing a red hat", "a cat to the left of a mug", "two birds on a branch", "a teapot"]
PLACES = ["in snow", "on a table", "in a garden"]


def tiny_folder(folder: Path, digits_only: bool) -> str:
    """Save the tiny random Qwen2.5-VL. ``digits_only`` (for the ranking): generation may only write
    "0".."9" or end, and weights are drawn with std 0.3 instead of 0.02, so that the replies depend on
    the sample at all (at 0.02 every sample gets the same digit)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from rewards.testing import QWEN_SPECIAL_TOKENS, tiny_qwen_vl, tiny_qwen_vl_config, tiny_qwen_vl_processor

    if digits_only:
        config = tiny_qwen_vl_config("qwen2_5_vl")
        for c in (config, config.text_config, config.vision_config):
            c.initializer_range = 0.3
        torch.manual_seed(0)
        model, processor = Qwen2_5_VLForConditionalGeneration(config).eval(), tiny_qwen_vl_processor()
    else:
        model, processor = tiny_qwen_vl("qwen2_5_vl", seed=0)
    tok = processor.tokenizer
    keep = {tok.convert_tokens_to_ids(str(d)) for d in range(10)} | {tok.convert_tokens_to_ids("<|im_end|>")}
    if digits_only:
        suppress = [i for i in range(len(tok)) if i not in keep]
    else:  # as in the tests: no special tokens mid-reply
        suppress = tok.convert_tokens_to_ids([t for t in QWEN_SPECIAL_TOKENS if t != "<|im_end|>"])
    model.generation_config.suppress_tokens = suppress
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def batch_of(n: int, seed: int = 0) -> tuple[torch.Tensor, RewardInputs]:
    g = torch.Generator().manual_seed(seed)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}, {PLACES[i % len(PLACES)]}" for i in range(n)]
    return torch.rand(n, 3, 64, 64, generator=g), RewardInputs.from_prompts(prompts)


def images_per_second(judge: VLMJudge, batch: int) -> float:
    images, inputs = batch_of(batch)
    judge(images[:1], inputs.select([0]))  # warm-up
    start = time.perf_counter()
    judge(images, inputs)
    return batch / (time.perf_counter() - start)


def serve(path: str, dtype: str, device: str) -> tuple[subprocess.Popen, str]:
    """``transformers serve`` pinned to ``path`` on a free port; waits for /health (240 s)."""
    import httpx

    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        raise SystemExit(
            "the `transformers` CLI is missing: pip install 'transformers[serving]' or use --no-serve"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [exe, "serve", path, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", device, "--dtype", dtype]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("transformers serve did not start within 240 s")


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def ranking(args: argparse.Namespace, path: str) -> None:
    common = dict(path=path, device=args.device, dtype=args.dtype, batch_size=8)
    if args.pairs:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
        pics = [pil_to_tensor(Image.open(r["image"]).convert("RGB").resize((512, 512))) / 255 for r in rows]
        images, inputs = torch.stack(pics), RewardInputs.from_prompts([r["prompt"] for r in rows])
        decoded = VLMJudge(**common, max_new_tokens=args.max_new_tokens)
    else:
        images, inputs = batch_of(args.samples, seed=1)
        # one digit: the most likely score token ("10" needs two tokens and is left out)
        decoded = VLMJudge(**common, prefill="[Score]: ", max_new_tokens=1)
    logit = VLMJudge(**common, mode="logit")
    d, lg = decoded(images, inputs), logit(images, inputs)
    both = [i for i in range(len(inputs)) if d["failed"][i] == 0 and lg["failed"][i] == 0]
    rho = spearman([float(d["raw"][i]) for i in both], [float(lg["raw"][i]) for i in both])
    print(
        f"\nranking on {len(inputs)} samples: decoded parsed {len(inputs) - int(d['failed'].sum())}, "
        f"logit scored {len(inputs) - int(lg['failed'].sum())}; Spearman rho (decoded vs logit) = {rho:.3f} "
        f"on {len(both)}; logit answer mass mean {float(lg['answer_mass'].mean()):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", help="a real judge folder (default: the tiny random Qwen2.5-VL)")
    parser.add_argument("--pairs", help="JSONL of {image, prompt} for the ranking (with --path)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--samples", type=int, default=48, help="ranking samples (tiny model)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="decoded reply budget for throughput")
    parser.add_argument("--no-serve", action="store_true", help="skip the transformers serve rows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("rewards.judge").setLevel(logging.ERROR)  # the random replies' parse failures
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or tiny_folder(Path(tmp) / "judge", digits_only=False)
        proc, url = (None, None) if args.no_serve else serve(path, args.dtype, args.device)
        try:
            judges = {
                ("in-process", "decoded"): VLMJudge(
                    path=path,
                    device=args.device,
                    dtype=args.dtype,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=32,
                ),
                ("in-process", "logit"): VLMJudge(
                    path=path, device=args.device, dtype=args.dtype, mode="logit", batch_size=32
                ),
            }
            if url:
                judges["served", "decoded"] = VLMJudge(
                    "openai",
                    base_url=url,
                    model=path,
                    max_new_tokens=args.max_new_tokens,
                    concurrency=8,
                    retries=0,
                )
            print(
                f"judge images/s, 64 x 64 images, decoded replies of <= {args.max_new_tokens} tokens, "
                f"{args.threads} CPU thread(s), {'tiny random Qwen2.5-VL' if not args.path else args.path}"
            )
            print(f"{'backend':<11} {'mode':<8} " + " ".join(f"{'batch ' + str(b):>9}" for b in args.batches))
            for (backend, mode), judge in judges.items():
                row = [images_per_second(judge, b) for b in args.batches]
                print(f"{backend:<11} {mode:<8} " + " ".join(f"{r:>9.2f}" for r in row))
            if url:
                print(
                    f"{'served':<11} {'logit':<8} "
                    + " ".join(f"{'n/a':>9}" for _ in args.batches)
                    + "   (transformers serve returns no logprobs)"
                )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        ranking(args, args.path or tiny_folder(Path(tmp) / "digits", digits_only=True))


if __name__ == "__main__":
    main()
