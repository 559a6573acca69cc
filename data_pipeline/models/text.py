"""Text models of the pipeline: prompt writers (stage ``prompts``) and instruction writers (``instruct``).

Templates stand in when no language model is configured; they are seeded per record and keep the
parts they chose (scene, relation, attribute) so that the instruction template can restate the
scene without describing any subject's appearance. The model-backed writers load transformers
models from local weights only (``local_files_only=True``) and batch every call.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from PIL import Image

SCENES = (
    "on a wooden kitchen table",
    "in a sunlit garden",
    "on a busy city sidewalk",
    "on a sandy beach at sunset",
    "in a cozy living room",
    "in a snowy forest clearing",
    "on a marble countertop",
    "in a grassy park",
    "on a desk in a bright office",
    "on a rocky mountain trail",
    "in a rustic barn",
    "on a picnic blanket in a meadow",
    "in a modern art gallery",
    "on a rainy street at night",
    "in a library between bookshelves",
    "on a wooden dock by a lake",
)
RELATIONS = ("to the left of", "to the right of", "above", "below", "next to")
ATTRIBUTES = (
    "wearing a knitted hat",
    "with a red ribbon tied around it",
    "covered in light snow",
    "wearing tiny sunglasses",
    "decorated with golden stripes",
    "wrapped in a plaid scarf",
    "with a small flower on top",
    "with a blue polka-dot pattern",
)
ACTIONS = (
    "tipping over",
    "floating in the air",
    "spinning",
    "sliding across the surface",
    "bouncing",
    "leaning against a wall",
    "half-buried in leaves",
    "balancing on its edge",
)


def _local(path: str, config_key: str, loader: Any, **kwargs: Any) -> Any:
    """``loader(path, local_files_only=True, **kwargs)``; a missing model names the config key."""
    try:
        return loader(path, local_files_only=True, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"{config_key}={path}: cannot load a transformers model from it (a local directory, or a hub id "
            f"already in the Hugging Face cache; nothing is downloaded): {err}"
        ) from err


def article(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def join_names(names: list[str], det: str = "the") -> str:
    """``"the a, the b and the c"``; ``det="a"`` picks a/an per noun."""
    items = [article(n) if det == "a" else f"{det} {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------------------------------------- prompts


class TemplatePrompter:
    """Prompts from templates, seeded per record (``plan["seed"]``).

    Args:
        edited_kinds: kinds whose attribute/action is added later by the ``edit`` stage: their
            text-to-image prompt leaves it out and ``edit`` carries it. For other attribute/action
            records the prompt states it directly.
    """

    description = "templates"

    def __init__(self, edited_kinds: list[str] | tuple[str, ...] = ()) -> None:
        self.edited_kinds = tuple(edited_kinds)

    def write(self, plans: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        return [self._one(p) for p in plans]

    def _one(self, plan: dict[str, Any]) -> dict[str, Any]:
        rng = random.Random(plan["seed"])
        names, kind = list(plan["categories"]), plan["kind"]
        scene = rng.choice(SCENES)
        parts: dict[str, Any] = {"scene": scene}
        if kind == "position" or kind == "complex":
            parts["relation"] = rng.choice(RELATIONS)
        if kind in ("attribute", "complex"):
            parts["modifier"] = {"subject": rng.randrange(len(names)), "text": rng.choice(ATTRIBUTES)}
        elif kind == "action":
            parts["modifier"] = {"subject": rng.randrange(len(names)), "text": rng.choice(ACTIONS)}
        edit = None
        modifier = parts.get("modifier")
        phrases = [article(n) for n in names]
        if modifier is not None:
            k = modifier["subject"]
            if kind in self.edited_kinds:
                edit = f"Make the {names[k]} {modifier['text']}. Keep everything else unchanged."
            else:
                phrases[k] = f"{phrases[k]} {modifier['text']}"
        if "relation" in parts:
            body = f"{phrases[0]} {parts['relation']} {', '.join(phrases[1:])}"
        else:
            body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        prompt = f"A photo of {body}, {scene}, clearly visible, natural light."
        others = [s for s in SCENES if s != scene]
        scene_prompts = [
            f"Place this {n} {rng.choice(others)}, keeping its exact shape, colours and details."
            for n in names
        ]
        return {"prompt": prompt, "scene_prompts": scene_prompts, "edit": edit, "parts": parts}


PROMPT_REQUEST = """You write prompts for a text-to-image model. Subjects: {subjects}. Task kind: {kind}.
Reply with one JSON object and nothing else:
{{"prompt": "<one photo-realistic scene with every subject, each clearly visible and separate>",
 "scenes": [<one instruction per subject, in order, placing that subject alone in a new scene>],
 "edit": {edit}}}
{hint}"""

KIND_HINTS = {
    "attribute": "Give one subject a distinctive accessory or pattern.",
    "action": "Let one subject do or undergo a visible action.",
    "background": "Put the subjects in a distinctive setting.",
    "position": "State where the subjects are relative to each other (left of, right of, above, below, next to).",
    "complex": "Combine a setting, a relative position and an accessory.",
    "three": "Arrange the three subjects naturally in one scene.",
    "four": "Arrange the four subjects naturally in one scene.",
}


def parse_prompt_json(text: str, names: list[str], needs_edit: bool) -> dict[str, Any] | str:
    """Parse a language model's reply into ``{"prompt", "scene_prompts", "edit"}`` or a reason.

    The first ``{...}`` span is read as JSON; the prompt must name every subject and there must be
    one scene per subject.
    """
    match = re.search(r"\{.*\}", text, flags=re.DOTALL)
    if match is None:
        return f"language model reply has no JSON object: {text[:80]!r}"
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError as err:
        return f"language model reply is not valid JSON ({err.msg}): {match.group(0)[:80]!r}"
    if not isinstance(obj, dict):
        return "language model reply is not a JSON object"
    prompt, scenes, edit = obj.get("prompt"), obj.get("scenes"), obj.get("edit")
    if not isinstance(prompt, str) or not prompt.strip():
        return "language model reply has no 'prompt' string"
    if (
        not isinstance(scenes, list)
        or len(scenes) != len(names)
        or not all(isinstance(s, str) and s.strip() for s in scenes)
    ):
        return f"language model reply needs 'scenes' with {len(names)} strings, got {scenes!r:.80}"
    missing = [n for n in names if n.lower() not in prompt.lower()]
    if missing:
        return f"language model prompt does not name {missing}: {prompt[:80]!r}"
    if needs_edit and (not isinstance(edit, str) or not edit.strip()):
        return "language model reply has no 'edit' instruction for an edited kind"
    return {
        "prompt": prompt.strip(),
        "scene_prompts": [s.strip() for s in scenes],
        "edit": str(edit).strip() if needs_edit else None,
        "parts": {},
    }


class CausalLMPrompter:
    """Prompts from a local causal language model (transformers), greedy by default, batched.

    Args:
        path: local model directory (or a hub id already in the cache); nothing is downloaded.
        edited_kinds: as in :class:`TemplatePrompter`.
        max_new_tokens: reply budget.
        do_sample, temperature: sampling (one record per call, seeded by its own seed) or greedy (batched).
        dtype, device: where the model runs.
        trust_remote_code: only if you trust the checkpoint's code.
        config_key: named in the error when ``path`` cannot be loaded.
    """

    def __init__(
        self,
        path: str,
        *,
        edited_kinds: list[str] | tuple[str, ...] = (),
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 0.8,
        dtype: str = "bfloat16",
        device: str = "cpu",
        trust_remote_code: bool = False,
        config_key: str = "paths.lm",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from psr.models.builders import parse_dtype

        self.tokenizer = _local(
            path, config_key, AutoTokenizer.from_pretrained, trust_remote_code=trust_remote_code
        )
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = (
            _local(
                path,
                config_key,
                AutoModelForCausalLM.from_pretrained,
                dtype=parse_dtype(dtype),
                trust_remote_code=trust_remote_code,
            )
            .to(device)
            .eval()
        )
        self.device = device
        self.edited_kinds = tuple(edited_kinds)
        self.max_new_tokens, self.do_sample, self.temperature = max_new_tokens, do_sample, temperature
        self.description = f"CausalLMPrompter({path}, greedy={not do_sample})"

    def request(self, plan: dict[str, Any]) -> str:
        needs_edit = plan["kind"] in self.edited_kinds
        text = PROMPT_REQUEST.format(
            subjects=", ".join(plan["categories"]),
            kind=plan["kind"],
            edit='"<an edit instruction adding the accessory or action>"' if needs_edit else "null",
            hint=KIND_HINTS.get(plan["kind"], ""),
        )
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text + "\n"

    def write(self, plans: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        import torch

        requests = [self.request(p) for p in plans]
        # sampling: one record per call, seeded by its own seed, so a record's text does not depend on
        # which records share its batch or shard; greedy decoding is batched
        groups = [[i] for i in range(len(plans))] if self.do_sample else [list(range(len(plans)))]
        replies: list[str] = [""] * len(plans)
        for idx in groups:
            enc = self.tokenizer([requests[i] for i in idx], return_tensors="pt", padding=True).to(
                self.device
            )
            if self.do_sample:
                torch.manual_seed(int(plans[idx[0]]["seed"]))
            with torch.no_grad():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=self.do_sample,
                    temperature=self.temperature if self.do_sample else None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, texts, strict=True):
                replies[i] = text
        return [
            parse_prompt_json(r, list(p["categories"]), p["kind"] in self.edited_kinds)
            for r, p in zip(replies, plans, strict=True)
        ]


# ---------------------------------------------------------------------------------------------- instructions


class TemplateInstructor:
    """The final instruction from the parts the template prompter chose; no appearance words.

    Records written by a language model carry no parts; for them the text-to-image prompt is used
    as the instruction (and the provenance says so).
    """

    description = "templates"

    def instruct(
        self, images: list[Image.Image], records: list[dict[str, Any]]
    ) -> list[tuple[str | None, str | None]]:
        return [(self._one(r), None) for r in records]

    @staticmethod
    def _one(record: dict[str, Any]) -> str:
        parts = record.get("parts") or {}
        if not parts:
            return record["prompt"]
        names = list(record["categories"])
        phrases = [f"the {n}" for n in names]
        modifier = parts.get("modifier")
        if modifier is not None:
            k = modifier["subject"]
            phrases[k] = f"{phrases[k]} {modifier['text']}"
        if "relation" in parts:
            body = f"{phrases[0]} {parts['relation']} {', '.join(phrases[1:])}"
        else:
            body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"Show {body} {parts['scene']}."


INSTRUCT_REQUEST = (
    "Write one instruction (one sentence) that asks an image generator to create exactly this image. "
    "Refer to the subjects only as: {names}. Do not describe their colours, materials or appearance; "
    "describe the scene, their positions, actions and accessories. Reply with the instruction only."
)


class VisionLanguageInstructor:
    """The final instruction from a local vision-language model (transformers ``image-text-to-text``).

    A reply that does not name every subject is rejected with that reason.

    Args:
        path: local model directory; nothing is downloaded.
        max_new_tokens, dtype, device, trust_remote_code, config_key: as in :class:`CausalLMPrompter`.
    """

    def __init__(
        self,
        path: str,
        *,
        max_new_tokens: int = 96,
        dtype: str = "bfloat16",
        device: str = "cpu",
        trust_remote_code: bool = False,
        config_key: str = "paths.vlm",
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from psr.models.builders import parse_dtype

        self.processor = _local(
            path, config_key, AutoProcessor.from_pretrained, trust_remote_code=trust_remote_code
        )
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        self.model = (
            _local(
                path,
                config_key,
                AutoModelForImageTextToText.from_pretrained,
                dtype=parse_dtype(dtype),
                trust_remote_code=trust_remote_code,
            )
            .to(device)
            .eval()
        )
        self.device, self.max_new_tokens = device, max_new_tokens
        self.description = f"VisionLanguageInstructor({path})"

    def instruct(
        self, images: list[Image.Image], records: list[dict[str, Any]]
    ) -> list[tuple[str | None, str | None]]:
        import torch

        texts = []
        for r in records:
            msg = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": INSTRUCT_REQUEST.format(names=", ".join(r["categories"]))},
                    ],
                }
            ]
            texts.append(self.processor.apply_chat_template(msg, add_generation_prompt=True, tokenize=False))
        enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        replies = self.processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        results: list[tuple[str | None, str | None]] = []
        for reply, r in zip(replies, records, strict=True):
            text = " ".join(reply.split())
            missing = [n for n in r["categories"] if n.lower() not in text.lower()]
            if not text:
                results.append((None, "vision-language model returned an empty instruction"))
            elif missing:
                results.append((None, f"vision-language instruction does not name {missing}: {text[:80]!r}"))
            else:
                results.append((text, None))
        return results
