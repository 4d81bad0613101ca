"""Any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, Ollama, LM Studio) via the official SDK."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import jsonschema
import openai

from agents import telemetry
from agents.llm.base import LLMError, Usage, parse_json_object

logger = logging.getLogger("agents.llm")


class OpenAIProvider:
    name = "openai"

    def __init__(
        self, *, base_url: str | None = None, model: str = "gpt-4o-mini", api_key: str | None = None,
        temperature: float = 0.2, timeout: float = 120.0, max_retries: int = 3, json_mode: bool = True,
        price_prompt_per_mtok: float = 0.0, price_completion_per_mtok: float = 0.0, repair_attempts: int = 1,
    ) -> None:
        self.model = model
        self.temperature = temperature
        self.json_mode = json_mode
        self.price_prompt = Decimal(str(price_prompt_per_mtok)) / Decimal(1_000_000)
        self.price_completion = Decimal(str(price_completion_per_mtok)) / Decimal(1_000_000)
        self.repair_attempts = repair_attempts
        # The SDK retries connection errors, 408, 409, 429 and 5xx with backoff.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout,
                                    max_retries=max_retries)
        self.base_url = str(self.client.base_url)  # as its spans name the server

    def _usage(self, response) -> Usage:
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = self.price_prompt * prompt + self.price_completion * completion
        return Usage(model=getattr(response, "model", None) or self.model, prompt_tokens=prompt,
                     completion_tokens=completion, cost_usd=cost.quantize(Decimal("0.000001")))

    def complete_json(self, messages: list[dict[str, str]], schema: dict[str, Any], *, purpose: str
                      ) -> tuple[dict[str, Any], Usage]:
        """Ask for a JSON object; when it is malformed or breaks the schema, say so and ask once more."""
        total = Usage(model=self.model)
        conversation = [
            *messages,
            {"role": "system", "content": "Reply with one JSON object only, matching this JSON schema:\n"
                                          + json.dumps(schema)},
        ]
        problem = ""
        for _ in range(1 + self.repair_attempts):
            try:
                with telemetry.llm_call(provider=self.name, model=self.model, purpose=purpose,
                                        base_url=self.base_url, temperature=self.temperature) as span:
                    response = self.client.chat.completions.create(
                        model=self.model, messages=conversation, temperature=self.temperature,
                        **({"response_format": {"type": "json_object"}} if self.json_mode else {}),
                    )
                    usage = self._usage(response)
                    telemetry.llm_result(span, response=response, input_tokens=usage.prompt_tokens,
                                         output_tokens=usage.completion_tokens, cost_usd=float(usage.cost_usd))
            except openai.APIStatusError as exc:
                retryable = exc.status_code >= 500 or exc.status_code in (408, 409, 429)
                raise LLMError(f"The LLM endpoint answered {exc.status_code}: {exc.message}", retryable=retryable) from exc
            except openai.APIConnectionError as exc:
                raise LLMError(f"The LLM endpoint could not be reached: {exc}", retryable=True) from exc
            total.add(usage)
            text = response.choices[0].message.content if response.choices else ""
            try:
                value = parse_json_object(text or "")
                jsonschema.validate(value, schema)
                return value, total
            except (ValueError, jsonschema.ValidationError) as exc:
                problem = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
                logger.info("LLM reply for %s was not valid (%s); asking for a repair", purpose, problem)
                conversation += [
                    {"role": "assistant", "content": text or ""},
                    {"role": "user", "content": f"That reply was not valid: {problem}. Reply again with only "
                                                 "the JSON object, matching the schema."},
                ]
        raise LLMError(f"The LLM gave no valid JSON for {purpose} after a repair: {problem}", retryable=True)
