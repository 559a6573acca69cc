"""A vision-language judge of semantic alignment (docs/method.md §6.1, "VLM judge").

The judge sees the generated image and a text built from a template whose ``{description}`` slot
holds the sample's instruction, and scores how well the image follows it on a 0-10 scale:

- ``mode="decoded"``: the model writes ``[Thought]: ... [Score]: ...`` (PSRBench's prompt family)
  and :func:`parse_score` reads the first ``[Score]: <number>``. ``temperature`` 0 is greedy
  (deterministic); PSRBench sampled at 0.2.
- ``mode="logit"``: no decoding. The assistant turn is prefilled up to the answer (``"[Score]: "``)
  and the score is the expectation over the next-token distribution restricted to the answers
  ``"0"``..``"10"``: ``E = sum_s s P(s) / sum_s P(s)`` (:func:`expected_score`). Qwen's tokenizer
  writes numbers digit by digit, so "10" is the token "1" followed by "0": one forward pass over
  the prompt with "1" appended reads both ``P(first = d)`` and ``P("0" | "1")``, and
  ``P(10) = P("1") P("0" | "1")``, ``P(1) = P("1") (1 - P("0" | "1"))``. With ``answer="yes_no"``
  (template ``yes_no``) the score is ``P(yes) / (P(yes) + P(no))``. ``answer_mass`` (the
  probability that the reply starts with an allowed answer at all) is reported.

``score`` is the 0-10 value / 10 (``raw`` keeps the 0-10 value). A reply without a parsable score,
a timeout or a refused request is NaN with ``failed = 1``: never a substitute value (PSRBench's
script uses 5, which hides failures).

Backends: ``transformers`` loads ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a local
``path`` (Qwen2.5-VL, Qwen3-VL; batched, left padding) in this process; ``openai`` talks to an
OpenAI-compatible server (vLLM, SGLang, ``transformers serve``) at ``base_url`` with
:class:`ChatClient`: images as base64 PNG data URLs, then the text, in one user message (as
PSRBench). Over a server the logit mode needs ``logprobs`` and an assistant prefill
(``continue_final_message``, vLLM/SGLang); ``transformers serve`` supports neither.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rewards.base import RewardInputs, check_images, resolve_dtype
from rewards.chat_client import ChatClient, chat_message, png_data_url, reply_text, reply_top_logprobs, to_pil
from rewards.loading import hf_from_pretrained

__all__ = [
    "VLMJudge",
    "ChatClient",
    "parse_score",
    "parse_yes_no",
    "expected_score",
    "load_template",
    "png_data_url",
    "TEMPLATES",
]

logger = logging.getLogger(__name__)

# PSRBench's rule: the first "[Score]: <digits and dots>" in the reply
SCORE_PATTERN = re.compile(r"\[Score\]:\s*([\d.]+)")
TEMPLATES = ("psrbench_attribute", "psrbench_action", "psrbench_background", "psrbench_complex", "yes_no")
# PSRBench's Three and Four subsets are judged with the Complex wording
_ALIASES = {"psrbench_three": "psrbench_complex", "psrbench_four": "psrbench_complex"}
_PREFILL = {"score": "[Score]: ", "yes_no": ""}
_YES, _NO = ("Yes", "yes", "YES"), ("No", "no", "NO")


def parse_score(text: str | None) -> float | None:
    """The first ``[Score]: <number>`` of a reply, if that number is in [0, 10]; else None.

    PSRBench's pattern ``\\[Score\\]:\\s*([\\d.]+)``, first match. A sentence-ending period after
    the number (``"[Score]: 7.5."``) is dropped; PSRBench's ``float("7.5.")`` raises and its script
    then skips the sample.
    """
    if not text:
        return None
    match = SCORE_PATTERN.search(text)
    if match is None:
        return None
    number = match.group(1).rstrip(".")
    try:
        value = float(number)
    except ValueError:  # "..", "7..5", "1.2.3"
        return None
    return value if 0.0 <= value <= 10.0 else None


def parse_yes_no(text: str | None) -> float | None:
    """10 for a reply whose first word is yes, 0 for no (any case, punctuation ignored); else None."""
    match = re.match(r"\W*([A-Za-z]+)", text or "")
    word = match.group(1).lower() if match else ""
    return {"yes": 10.0, "no": 0.0}.get(word)


def expected_score(
    digits: Sequence[float], ten: float | None = None, zero_after_one: float | None = None
) -> tuple[float, float]:
    """Expected 0-10 score from answer-token probabilities, and the probability mass they hold.

    Args:
        digits: ``P(first answer token = "d")`` for d = 0..9.
        ten: ``P(first answer token = "10")`` when "10" is one token.
        zero_after_one: ``P(next = "0" | first = "1")`` when "10" is "1" then "0" (Qwen): the
            mass of "1" splits into 1 and 10.

    Returns:
        ``(sum_s s P(s) / sum_s P(s), sum_s P(s))``; NaN for the expectation when the mass is 0.
    """
    if len(digits) != 10:
        raise ValueError(f"expected_score: digits needs P(0)..P(9), got {len(digits)} values")
    probs = {d: float(p) for d, p in enumerate(digits)}
    if ten is not None:
        probs[10] = float(ten)
    elif zero_after_one is not None:
        probs[10] = probs[1] * float(zero_after_one)
        probs[1] = probs[1] * (1.0 - float(zero_after_one))
    mass = sum(probs.values())
    if mass <= 0:
        return math.nan, 0.0
    return sum(s * p for s, p in probs.items()) / mass, mass


def load_template(name_or_path: str) -> str:
    """A judge template: a shipped name (:data:`TEMPLATES`, ``psrbench_three``/``four``) or a text
    file path. It must hold one ``{description}`` slot."""
    name = _ALIASES.get(str(name_or_path), str(name_or_path))
    if name in TEMPLATES:
        text = (resources.files("rewards") / "templates" / "judge" / f"{name}.txt").read_text(
            encoding="utf-8"
        )
        source = f"shipped template {name!r}"
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(
                f"VLMJudge: template={name_or_path!r} is neither a shipped template "
                f"{sorted(TEMPLATES + tuple(_ALIASES))} nor an existing file"
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    if text.count("{description}") != 1:
        raise ValueError(f"VLMJudge: {source} must contain the slot {{description}} exactly once")
    return text.strip()


# ------------------------------------------------------------------------------------ in-process backend


class LocalVLM:
    """A transformers image-text-to-text model and processor from a local folder, batched with left
    padding. Each request is (its images, its text), in one user message."""

    def __init__(
        self,
        path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "bfloat16",
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        expected = "a transformers vision-language model folder (config.json, weights, processor files)"
        kw: dict[str, Any] = dict(owner="VLMJudge", key="path", expected=expected)
        self.processor = hf_from_pretrained(AutoProcessor, path, trust_remote_code=trust_remote_code, **kw)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        model = hf_from_pretrained(
            AutoModelForImageTextToText, path, dtype=self.dtype, trust_remote_code=trust_remote_code, **kw
        )
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches: every prompt ends at the last column
        self.batch_size = int(batch_size)

    def _encode(self, requests: Sequence[tuple[list[Tensor], str]], prefill: str = "") -> Any:
        texts, images = [], []
        for imgs, text in requests:
            content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": content}]
            chat = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            texts.append(chat + prefill)
            images += [to_pil(im) for im in imgs]
        enc = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        return enc.to(self.device, dtype=self.dtype)  # the dtype applies to floating inputs (pixels) only

    def _chunks(self, n: int) -> list[range]:
        return [range(i, min(n, i + self.batch_size)) for i in range(0, n, self.batch_size)]

    @torch.no_grad()
    def complete(
        self,
        requests: Sequence[tuple[list[Tensor], str]],
        *,
        temperature: float,
        max_new_tokens: int,
        prefill: str = "",
    ) -> list[str]:
        replies: list[str] = []
        for idx in self._chunks(len(requests)):
            enc = self._encode([requests[i] for i in idx], prefill)
            sample = temperature > 0
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
            )
            texts = self.processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            replies += [t.strip() for t in texts]
        return replies

    def token_id(self, text: str) -> int | None:
        """The id of ``text`` when it is one token, else None."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return int(ids[0]) if len(ids) == 1 else None

    @torch.no_grad()
    def answer_probs(
        self, requests: Sequence[tuple[list[Tensor], str]], prefill: str, follow: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Next-token probabilities after ``prefill``, ``[B, V]`` fp32, from one forward pass; with
        ``follow`` (a token id) appended to every prompt, also the probabilities after it ``[B, V]``."""
        first, second = [], []
        for idx in self._chunks(len(requests)):
            enc = self._encode([requests[i] for i in idx], prefill)
            ids = enc["input_ids"]
            if follow is not None:  # one more column: every per-token input (ids, mask, token types) grows
                for key, value in list(enc.items()):
                    if (
                        isinstance(value, Tensor)
                        and not value.is_floating_point()
                        and value.shape == ids.shape
                    ):
                        fill = follow if key == "input_ids" else (1 if key == "attention_mask" else 0)
                        enc[key] = torch.cat([value, torch.full_like(value[:, :1], fill)], dim=1)
            keep = 2 if follow is not None else 1
            logits = self.model(**enc, logits_to_keep=keep).logits[:, -keep:].float()  # [b, keep, V]
            probs = logits.softmax(-1)
            first.append(probs[:, 0])
            if follow is not None:
                second.append(probs[:, 1])
        return torch.cat(first), (torch.cat(second) if second else None)


# ------------------------------------------------------------------------------------------ the judge


class VLMJudge:
    """The semantic-alignment judge as a Reward: ``judge(images, inputs) -> {"score", "raw", "failed"}``
    (logit mode adds ``"answer_mass"``), each ``[B]`` float32 (see the module docstring).

    Args:
        backend: ``"transformers"`` (in-process, from ``path``) or ``"openai"`` (a server at ``base_url``).
        path: local model folder (transformers backend); nothing is downloaded.
        base_url: the server's OpenAI base URL, e.g. ``http://localhost:8000/v1`` (openai backend).
        model: the served model name (openai backend; for ``transformers serve`` the folder it serves).
        api_key_env: environment variable holding the API key (unset or empty: no key is sent).
        template: a shipped template (``psrbench_complex``, ``psrbench_attribute``, ``psrbench_action``,
            ``psrbench_background``, ``psrbench_three``/``four`` = complex, ``yes_no``) or a file path.
        mode: ``"decoded"`` (generate, parse ``[Score]:``) or ``"logit"`` (one forward, expected score).
        answer: ``"score"`` (0-10) or ``"yes_no"`` (logit: 10 P(yes) / (P(yes) + P(no)); decoded: 10 for
            a reply starting with yes, 0 for no); ``None``: ``yes_no`` for the ``yes_no`` template.
        prefill: the start of the assistant turn, written for the model (``None``: in logit mode
            ``"[Score]: "`` for scores and nothing for yes/no; in decoded mode nothing, so the model
            writes its thought first). A decoded reply is parsed as prefill + reply.
        temperature: decoded mode; 0 = greedy (PSRBench: 0.2).
        max_new_tokens: decoded mode reply budget.
        top_logprobs: logit mode over a server: how many alternatives the server returns (vLLM <= 20).
        batch_size: images per forward (transformers backend).
        timeout, retries, backoff, max_backoff, concurrency: :class:`ChatClient`.
        device, dtype, trust_remote_code: transformers backend.
    """

    def __init__(
        self,
        backend: str = "transformers",
        *,
        path: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        api_key_env: str | None = "PSR_JUDGE_API_KEY",
        template: str = "psrbench_complex",
        mode: str = "decoded",
        answer: str | None = None,
        prefill: str | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = 512,
        top_logprobs: int = 20,
        batch_size: int = 8,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "bfloat16",
        trust_remote_code: bool = False,
    ) -> None:
        if mode not in ("decoded", "logit"):
            raise ValueError(f"VLMJudge: mode={mode!r}; expected 'decoded' or 'logit'")
        if temperature < 0 or max_new_tokens < 1:
            raise ValueError("VLMJudge: needs temperature >= 0 and max_new_tokens >= 1")
        self.backend, self.mode = backend, mode
        self.temperature, self.max_new_tokens, self.top_logprobs = (
            float(temperature),
            int(max_new_tokens),
            int(top_logprobs),
        )
        self.local: LocalVLM | None = None
        self.client: ChatClient | None = None
        if backend == "transformers":
            self.local = LocalVLM(
                str(path),
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                trust_remote_code=trust_remote_code,
            )
            self.model = str(path)
        elif backend == "openai":
            if not model or str(model) == "???":
                raise ValueError("VLMJudge: backend=openai needs model (the served model's name)")
            self.client = ChatClient(
                str(base_url),
                api_key_env=api_key_env,
                timeout=timeout,
                retries=retries,
                backoff=backoff,
                max_backoff=max_backoff,
                concurrency=concurrency,
                owner="VLMJudge",
            )
            self.model = str(model)
        else:
            raise ValueError(f"VLMJudge: backend={backend!r}; expected 'transformers' or 'openai'")
        self._set_template(template, answer, prefill)

    def _set_template(self, template: str, answer: str | None, prefill: str | None) -> None:
        self.template_name, self.template = str(template), load_template(template)
        self.answer = answer or ("yes_no" if self.template_name == "yes_no" else "score")
        if self.answer not in _PREFILL:
            raise ValueError(f"VLMJudge: answer={self.answer!r}; expected 'score' or 'yes_no'")
        default = _PREFILL[self.answer] if self.mode == "logit" else ""
        self.prefill = default if prefill is None else str(prefill)

    def with_template(
        self, name_or_path: str, *, answer: str | None = None, prefill: str | None = None
    ) -> VLMJudge:
        """The same loaded backend with another template (the model is not loaded again)."""
        other = copy.copy(self)
        other._set_template(name_or_path, answer, prefill)
        return other

    def __repr__(self) -> str:
        where = f"path={self.model!r}" if self.local else f"url={self.client.url!r}, model={self.model!r}"  # type: ignore[union-attr]
        return f"VLMJudge({self.backend}, {where}, template={self.template_name!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ raw replies

    def complete(self, images: list[list[Tensor]], texts: list[str]) -> list[str | None]:
        """Raw replies for B requests (request b: ``images[b]`` in order, then ``texts[b]``); None where
        the request failed after the retries (server backend)."""
        if len(images) != len(texts):
            raise ValueError(f"VLMJudge.complete: {len(images)} image lists but {len(texts)} texts")
        return self._complete(list(zip(images, texts, strict=True)))[0]

    def _complete(
        self, requests: list[tuple[list[Tensor], str]], prefill: str = ""
    ) -> tuple[list[str | None], list[str | None]]:
        if self.local is not None:
            local = self.local.complete(
                requests, temperature=self.temperature, max_new_tokens=self.max_new_tokens, prefill=prefill
            )
            return list(local), [None] * len(local)
        assert self.client is not None
        payloads = [
            self._payload(imgs, text, prefill, temperature=self.temperature, max_tokens=self.max_new_tokens)
            for imgs, text in requests
        ]
        replies, reasons = [], []
        for data, why in self.client.map(payloads):
            text, bad = reply_text(data) if why is None else (None, why)
            replies.append(text)
            reasons.append(bad)
        return replies, reasons

    def _payload(self, images: list[Tensor], text: str, prefill: str, **params: Any) -> dict[str, Any]:
        """A chat completion request; a prefill continues the assistant turn (vLLM / SGLang's
        ``continue_final_message``) instead of opening a new one."""
        messages = [chat_message(images, text)]
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
            params |= {"continue_final_message": True, "add_generation_prompt": False}
        return {"model": self.model, "messages": messages, **params}

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "VLMJudge")
        requests = [
            ([images[b]], self.template.replace("{description}", p)) for b, p in enumerate(inputs.prompts)
        ]
        out: dict[str, Tensor] = {}
        if self.mode == "decoded":
            replies, reasons = self._complete(requests, self.prefill)
            parse, wanted = (
                (parse_score, "[Score]: 0-10") if self.answer == "score" else (parse_yes_no, "yes/no")
            )
            raw = [None if r is None else parse(self.prefill + r) for r in replies]
            reasons = [
                f"no {wanted} in the reply {str(r)[:80]!r}" if why is None and v is None else why
                for r, v, why in zip(replies, raw, reasons, strict=True)
            ]
        else:
            raw, mass, reasons = self._logit_scores(requests)
            out["answer_mass"] = torch.tensor(mass, dtype=torch.float32)
        values = torch.tensor([math.nan if v is None else v for v in raw], dtype=torch.float32)
        failed = torch.isnan(values)
        if failed.any():
            why = sorted({str(r) for r, f in zip(reasons, failed.tolist(), strict=True) if f})
            logger.warning(
                "VLMJudge: %d of %d samples got no score: %s", int(failed.sum()), len(raw), why[:3]
            )
        return {"score": values / 10.0, "raw": values, "failed": failed.float(), **out}

    def _logit_scores(
        self, requests: list[tuple[list[Tensor], str]]
    ) -> tuple[list[float | None], list[float], list[str | None]]:
        labels = [str(d) for d in range(10)] + ["10"] if self.answer == "score" else list(_YES + _NO)
        if self.local is not None:
            probs = self._local_label_probs(requests, labels)
            reasons: list[str | None] = [None] * len(requests)
        else:
            probs, reasons = self._served_label_probs(requests)
        raw: list[float | None] = []
        masses: list[float] = []
        for p in probs:
            if p is None:
                raw.append(None)
                masses.append(math.nan)
                continue
            if self.answer == "score":
                value, mass = expected_score(
                    [p.get(str(d), 0.0) for d in range(10)], p.get("10"), p.get("0|1")
                )
            else:
                yes, no = sum(p.get(t, 0.0) for t in _YES), sum(p.get(t, 0.0) for t in _NO)
                mass = yes + no
                value = 10.0 * yes / mass if mass > 0 else math.nan
            raw.append(None if math.isnan(value) else value)
            masses.append(mass)
        reasons = [
            "no probability on any answer token" if v is None and r is None else r
            for v, r in zip(raw, reasons, strict=True)
        ]
        return raw, masses, reasons

    def _local_label_probs(
        self, requests: list[tuple[list[Tensor], str]], labels: list[str]
    ) -> list[dict[str, float] | None]:
        assert self.local is not None
        ids = {t: self.local.token_id(t) for t in labels}
        follow = zero = None
        if self.answer == "score":
            missing = [str(d) for d in range(10) if ids[str(d)] is None]
            if missing:
                raise ValueError(
                    f"VLMJudge: logit mode needs the digits 0-9 as single tokens; {missing} are not"
                )
            if ids["10"] is None:  # "10" = "1" then "0" (Qwen): read P("0" | "1") in the same pass
                follow, zero = ids["1"], ids["0"]
        else:
            ids = {t: i for t, i in ids.items() if i is not None}
            if not any(t in ids for t in _YES) or not any(t in ids for t in _NO):
                raise ValueError("VLMJudge: answer=yes_no needs 'Yes'/'yes' and 'No'/'no' as single tokens")
        first, second = self.local.answer_probs(requests, self.prefill, follow)
        out: list[dict[str, float] | None] = []
        for b in range(len(requests)):
            p = {t: float(first[b, i]) for t, i in ids.items() if i is not None}
            if second is not None and zero is not None:
                p["0|1"] = float(second[b, zero])
            out.append(p)
        return out

    def _served_label_probs(
        self, requests: list[tuple[list[Tensor], str]]
    ) -> tuple[list[dict[str, float] | None], list[str | None]]:
        assert self.client is not None

        def payload(imgs: list[Tensor], text: str, prefill: str) -> dict[str, Any]:
            params = {
                "temperature": 0.0,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
            }
            return self._payload(imgs, text, prefill, **params)

        def top(data: dict[str, Any] | None, why: str | None) -> tuple[dict[str, float] | None, str | None]:
            return reply_top_logprobs(data) if why is None else (None, why)

        results = [top(*r) for r in self.client.map([payload(i, t, self.prefill) for i, t in requests])]
        probs = [p for p, _ in results]
        reasons = [why for _, why in results]
        # a server tokenizer without a "10" token writes it as "1" then "0": ask for P("0" | "1")
        again = [
            b
            for b, p in enumerate(probs)
            if self.answer == "score" and p is not None and p.get("1", 0.0) > 0 and "10" not in p
        ]
        second = self.client.map([payload(*requests[b], self.prefill + "1") for b in again])
        for b, (data, why) in zip(again, second, strict=True):
            p2, why2 = top(data, why)
            if p2 is None:
                probs[b], reasons[b] = None, f"second request (after '1'): {why2}"
            else:
                probs[b]["0|1"] = p2.get("0", 0.0)  # type: ignore[index]
        return probs, reasons
