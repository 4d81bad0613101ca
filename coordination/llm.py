"""The server's own LLM (planner, auditor, synthesis), configured like a worker's."""

from django.conf import settings


def server_llm():
    """The configured provider, or None when AM_LLM is 'none' (plans then fail, audits use checks only)."""
    if settings.AM_LLM == "none":
        return None
    from agents.llm import make_llm

    if settings.AM_LLM == "scripted":
        return make_llm("scripted")
    return make_llm(
        "openai",
        base_url=settings.AM_LLM_BASE_URL or None,
        model=settings.AM_LLM_MODEL,
        api_key=settings.AM_LLM_API_KEY or None,
        price_prompt_per_mtok=settings.AM_LLM_PRICE_PROMPT_PER_MTOK,
        price_completion_per_mtok=settings.AM_LLM_PRICE_COMPLETION_PER_MTOK,
        json_mode=settings.AM_LLM_JSON_MODE,
    )
