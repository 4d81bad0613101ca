"""LLM providers: one module each. `make_llm(config)` picks one by name."""

from agents.llm.base import LLM, LLMError, Usage


def make_llm(name: str, **options) -> LLM:
    if name == "openai":
        from agents.llm.openai_provider import OpenAIProvider

        return OpenAIProvider(**options)
    if name == "scripted":
        from agents.llm.scripted import ScriptedProvider

        return ScriptedProvider()
    raise ValueError(f"Unknown LLM provider {name!r}: use 'openai' or 'scripted'.")


__all__ = ["LLM", "LLMError", "Usage", "make_llm"]
