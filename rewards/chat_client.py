"""A client of OpenAI-compatible chat servers (vLLM, SGLang, ``transformers serve``) over ``httpx``.

Why ``httpx`` rather than the ``openai`` package: the judge needs its own failure policy (which
errors to retry, a bounded backoff, a failure reason per request instead of an exception, a key
that never reaches a log) and non-standard request fields (vLLM's ``continue_final_message``);
``httpx`` gives exactly that with one small dependency (``openai`` itself is built on it) and
no response models to validate. Messages carry images as base64 PNG data URLs (lossless 8-bit),
then the text, in one user message, as PSRBench sends them. Used by :mod:`rewards.judge` and the
data pipeline's server-backed text models.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

__all__ = ["ChatClient", "chat_message", "png_data_url", "to_pil", "reply_text", "reply_top_logprobs"]


def to_pil(image: Tensor) -> Any:
    """``[3, h, w]`` in [0, 1] as 8-bit RGB: what a PNG carries, so both backends see equal pixels."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image must be [3, h, w], got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def png_data_url(image: Tensor) -> str:
    """``[3, h, w]`` in [0, 1] as a ``data:image/png;base64,...`` URL (lossless, 8 bits)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ChatClient:
    """A client of an OpenAI-compatible ``/chat/completions`` endpoint over ``httpx`` (JSON only).

    Retries timeouts, dropped connections, HTTP 429 and 5xx up to ``retries`` times with exponential
    backoff (``backoff * 2^k`` seconds, times a random factor in [0.5, 1], at most ``max_backoff``;
    a ``Retry-After`` header is honoured up to ``max_backoff``). Other HTTP errors (a refused
    request) and replies that are not JSON objects fail at once. A call takes at most
    ``(retries + 1) * timeout`` plus the backoffs (``timeout`` bounds each connect and each wait for
    data). ``concurrency`` requests run at a time. The API key is read from the environment
    variable ``api_key_env`` (no key: no header), sent as a Bearer token, and never logged or shown.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key_env: str | None = "PSR_JUDGE_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        owner: str = "ChatClient",
    ) -> None:
        import httpx

        if not base_url or str(base_url) == "???":
            raise ValueError(f"{owner}: base_url is not set (e.g. http://localhost:8000/v1)")
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError(f"{owner}: needs concurrency >= 1, retries >= 0, timeout > 0")
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.timeout, self.retries, self.concurrency = float(timeout), int(retries), int(concurrency)
        self.backoff, self.max_backoff, self.owner = float(backoff), float(max_backoff), owner
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, concurrency={self.concurrency}, api_key={'set' if self._key else 'unset'})"

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            with contextlib.suppress(ValueError):  # an HTTP date: keep the exponential delay
                delay = max(delay, min(self.max_backoff, float(retry_after)))
        return delay

    def post(self, payload: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """``(reply JSON object, None)`` or ``(None, why it failed)`` after the retries."""
        import httpx

        reason, retry_after = "no attempt", None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
            retry_after = None
            try:
                response = self._http.post(self.url, json=payload)
            except httpx.TimeoutException:
                reason = f"timed out (timeout={self.timeout} s)"
                continue
            except httpx.TransportError as err:  # refused or dropped connection, broken protocol
                reason = f"connection failed ({type(err).__name__})"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                reason, retry_after = f"HTTP {response.status_code}", response.headers.get("retry-after")
                continue
            if response.status_code != 200:
                return None, self._redact(f"HTTP {response.status_code}: {response.text[:200]!r}")
            try:
                data = response.json()
            except ValueError:
                return None, self._redact(f"reply is not JSON: {response.text[:80]!r}")
            if not isinstance(data, dict):
                return None, f"reply is not a JSON object ({type(data).__name__})"
            return data, None
        return None, f"{reason} after {self.retries + 1} attempts"

    def map(self, payloads: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, str | None]]:
        """:meth:`post` for every payload, ``concurrency`` at a time, in order."""
        if len(payloads) <= 1:
            return [self.post(p) for p in payloads]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(payloads))) as pool:
            return list(pool.map(self.post, payloads))

    def close(self) -> None:
        self._http.close()


def chat_message(images: Sequence[Tensor], text: str) -> dict[str, Any]:
    """One user message: each image as a PNG data URL, in order, then the text (PSRBench's layout)."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images
    ]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def reply_text(data: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """``choices[0].message.content`` of a chat completion, or ``(None, reason)``."""
    try:
        content = data["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None, "reply has no choices[0].message.content"
    return (content.strip(), None) if isinstance(content, str) else (None, "reply content is not a string")


def reply_top_logprobs(data: dict[str, Any] | None) -> tuple[dict[str, float] | None, str | None]:
    """The first generated token's ``top_logprobs`` as ``{token text (stripped): probability}``
    (vLLM/OpenAI layout ``choices[0].logprobs.content[0].top_logprobs[*].{token, logprob}``);
    tokens whose stripped text coincides add up."""
    try:
        top = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]  # type: ignore[index]
        probs: dict[str, float] = {}
        for entry in top:
            token = str(entry["token"]).strip()
            probs[token] = probs.get(token, 0.0) + math.exp(float(entry["logprob"]))
    except (KeyError, IndexError, TypeError, ValueError):
        return (
            None,
            "reply has no choices[0].logprobs.content[0].top_logprobs (does the server support logprobs?)",
        )
    return probs, None
