"""Prompt and instruction writers served by an OpenAI-compatible server (vLLM, SGLang,
``transformers serve``): the requests of :mod:`.text`'s local writers, sent through the VLM judge's
client (:class:`rewards.chat_client.ChatClient`: retries with bounded backoff, ``concurrency``
requests in flight, the API key from an environment variable). A request that fails after the
retries rejects its record with the reason, as a reply that does not parse does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.models.text import INSTRUCT_REQUEST, KIND_HINTS, PROMPT_REQUEST, parse_prompt_json
from rewards.chat_client import ChatClient, chat_message, reply_text


class _Served:
    def __init__(self, base_url: str, model: str, owner: str, **client: Any) -> None:
        if not model or str(model) == "???":
            raise ValueError(f"{owner}: model (the served model's name) is not set")
        self.client, self.model = ChatClient(base_url, owner=owner, **client), str(model)
        self.description = f"{owner}({self.client.url}, model={model})"

    def _ask(
        self, messages: list[dict[str, Any]], seeds: list[int | None], **params: Any
    ) -> list[tuple[str | None, str | None]]:
        payloads = [
            {"model": self.model, "messages": [m], **params, **({"seed": s} if s is not None else {})}
            for m, s in zip(messages, seeds, strict=True)
        ]
        return [reply_text(data) if why is None else (None, why) for data, why in self.client.map(payloads)]


class OpenAIPrompter(_Served):
    """Prompts written by a served language model; replies parsed as JSON (:func:`.text.parse_prompt_json`).

    Args:
        base_url: the server's OpenAI base URL, e.g. ``http://localhost:8000/v1``.
        model: the served model's name.
        edited_kinds: as in :class:`.text.TemplatePrompter`.
        max_new_tokens: reply budget.
        temperature: 0 = greedy; above 0, each request carries its record's seed (servers that honour
            ``seed``, such as vLLM, then give a record the same text whatever its batch).
        api_key_env, timeout, retries, concurrency: :class:`rewards.chat_client.ChatClient`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        edited_kinds: list[str] | tuple[str, ...] = (),
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        api_key_env: str | None = "PSR_LM_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        concurrency: int = 8,
    ) -> None:
        kw = dict(api_key_env=api_key_env, timeout=timeout, retries=retries, concurrency=concurrency)
        super().__init__(base_url, model, "OpenAIPrompter", **kw)
        self.edited_kinds, self.max_new_tokens, self.temperature = (
            tuple(edited_kinds),
            max_new_tokens,
            temperature,
        )

    def request(self, plan: dict[str, Any]) -> str:
        needs_edit = plan["kind"] in self.edited_kinds
        return PROMPT_REQUEST.format(
            subjects=", ".join(plan["categories"]),
            kind=plan["kind"],
            edit='"<an edit instruction adding the accessory or action>"' if needs_edit else "null",
            hint=KIND_HINTS.get(plan["kind"], ""),
        )

    def write(self, plans: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        messages = [{"role": "user", "content": self.request(p)} for p in plans]
        seeds = [int(p["seed"]) if self.temperature > 0 else None for p in plans]
        replies = self._ask(messages, seeds, temperature=self.temperature, max_tokens=self.max_new_tokens)
        return [
            parse_prompt_json(text, list(p["categories"]), p["kind"] in self.edited_kinds)
            if text is not None
            else f"language model request failed: {why}"
            for (text, why), p in zip(replies, plans, strict=True)
        ]


class OpenAIInstructor(_Served):
    """Final instructions written by a served vision-language model from the (edited) target; a
    reply that does not name every subject is rejected with that reason.

    Args: as :class:`OpenAIPrompter` (greedy: ``temperature`` 0 by default).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        max_new_tokens: int = 96,
        temperature: float = 0.0,
        api_key_env: str | None = "PSR_VLM_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        concurrency: int = 8,
    ) -> None:
        kw = dict(api_key_env=api_key_env, timeout=timeout, retries=retries, concurrency=concurrency)
        super().__init__(base_url, model, "OpenAIInstructor", **kw)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def instruct(
        self, images: list[Image.Image], records: list[dict[str, Any]]
    ) -> list[tuple[str | None, str | None]]:
        messages = [
            chat_message([_tensor(im)], INSTRUCT_REQUEST.format(names=", ".join(r["categories"])))
            for im, r in zip(images, records, strict=True)
        ]
        seeds = [int(r["seed"]) if self.temperature > 0 and "seed" in r else None for r in records]
        replies = self._ask(messages, seeds, temperature=self.temperature, max_tokens=self.max_new_tokens)
        results: list[tuple[str | None, str | None]] = []
        for (reply, why), r in zip(replies, records, strict=True):
            text = " ".join((reply or "").split())
            missing = [n for n in r["categories"] if n.lower() not in text.lower()]
            if reply is None:
                results.append((None, f"vision-language request failed: {why}"))
            elif not text:
                results.append((None, "vision-language model returned an empty instruction"))
            elif missing:
                results.append((None, f"vision-language instruction does not name {missing}: {text[:80]!r}"))
            else:
                results.append((text, None))
        return results


def _tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image as ``[3, h, w]`` in [0, 1] (exact: the PNG sent holds the same bytes)."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
