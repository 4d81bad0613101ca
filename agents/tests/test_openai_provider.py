"""The openai provider through the official SDK, against a local chat-completions server."""

from decimal import Decimal

import pytest

from agents.llm.base import LLMError
from agents.llm.openai_provider import OpenAIProvider
from agents.react import ACTION_SCHEMA

FINISH = {"thought": "done", "action": {"tool": "finish", "args": {"result": "ok"}}}
MESSAGES = [{"role": "user", "content": "do it"}]


def _provider(fake, **extra) -> OpenAIProvider:
    return OpenAIProvider(base_url=fake.base_url, model="test-model", api_key="k", timeout=10,
                          price_prompt_per_mtok=2.0, price_completion_per_mtok=8.0, **extra)


class OpenAIProviderTests:
    def test_it_returns_valid_json_with_usage_and_cost(self, fake_llm):
        fake_llm.reply_json(FINISH, prompt_tokens=1000, completion_tokens=500)
        value, usage = _provider(fake_llm).complete_json(MESSAGES, ACTION_SCHEMA, purpose="act")
        assert value == FINISH
        assert (usage.model, usage.prompt_tokens, usage.completion_tokens) == ("test-model", 1000, 500)
        assert usage.cost_usd == Decimal("0.006000")
        request = fake_llm.requests[0]
        assert request["model"] == "test-model"
        assert request["response_format"] == {"type": "json_object"}
        assert "JSON schema" in request["messages"][-1]["content"]

    def test_it_repairs_malformed_output_once(self, fake_llm):
        fake_llm.reply_text("Sure! Here is my answer: thought=done")
        fake_llm.reply_text("```json\n" + '{"thought": "fixed", "action": {"tool": "finish", "args": {}}}' + "\n```")
        value, usage = _provider(fake_llm).complete_json(MESSAGES, ACTION_SCHEMA, purpose="act")
        assert value["thought"] == "fixed"
        assert usage.prompt_tokens == 22  # both calls counted
        assert "was not valid" in fake_llm.requests[1]["messages"][-1]["content"]

    def test_it_repairs_output_that_breaks_the_schema(self, fake_llm):
        fake_llm.reply_json({"thought": "x", "action": {"tool": "rm_rf"}})
        fake_llm.reply_json(FINISH)
        value, _ = _provider(fake_llm).complete_json(MESSAGES, ACTION_SCHEMA, purpose="act")
        assert value == FINISH
        assert "rm_rf" in fake_llm.requests[1]["messages"][-1]["content"]

    def test_it_gives_up_after_one_repair_with_a_retryable_error(self, fake_llm):
        fake_llm.reply_text("nope")
        fake_llm.reply_text("still nope")
        with pytest.raises(LLMError) as info:
            _provider(fake_llm).complete_json(MESSAGES, ACTION_SCHEMA, purpose="act")
        assert info.value.retryable is True

    def test_it_recovers_from_an_http_500(self, fake_llm):
        fake_llm.reply_status(500)
        fake_llm.reply_json(FINISH)
        value, _ = _provider(fake_llm).complete_json(MESSAGES, ACTION_SCHEMA, purpose="act")
        assert value == FINISH
        assert len(fake_llm.requests) == 2

    def test_a_client_error_is_not_retryable(self, fake_llm):
        fake_llm.reply_status(401, "bad key")
        with pytest.raises(LLMError) as info:
            _provider(fake_llm, max_retries=0).complete_json(MESSAGES, ACTION_SCHEMA, purpose="act")
        assert info.value.retryable is False and "401" in str(info.value)

    def test_persistent_server_errors_are_retryable(self, fake_llm):
        for _ in range(3):
            fake_llm.reply_status(503)
        with pytest.raises(LLMError) as info:
            _provider(fake_llm, max_retries=2).complete_json(MESSAGES, ACTION_SCHEMA, purpose="act")
        assert info.value.retryable is True
