from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol


@dataclass
class Usage:
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    def add(self, other: Usage) -> None:
        self.model = other.model or self.model
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": float(self.cost_usd)}


class LLMError(Exception):
    """The LLM could not give a usable answer; `retryable` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class LLM(Protocol):
    name: str

    def complete_json(self, messages: list[dict[str, str]], schema: dict[str, Any], *, purpose: str
                      ) -> tuple[dict[str, Any], Usage]:
        """One JSON object that validates against `schema`, and what producing it cost."""


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_json_object(text: str) -> dict[str, Any]:
    """The JSON object in an LLM reply, tolerating a Markdown code fence around it."""
    match = _FENCE.match(text or "")
    payload = match.group(1) if match else (text or "").strip()
    value = json.loads(payload)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value
