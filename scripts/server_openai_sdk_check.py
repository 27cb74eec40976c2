#!/usr/bin/env python3
"""Drive safeguard serve's OpenAI-compatible endpoints with the official OpenAI Python SDK.

Usage: server_openai_sdk_check.py BASE_URL API_KEY   (BASE_URL ends in /v1)
Exits non-zero with a message on the first mismatch. Run by crates/safeguard/tests/serve_openai_sdk.rs.
"""
import sys

from openai import OpenAI


def main() -> int:
    base_url, api_key = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)

    models = client.models.list()
    model = models.data[0].id
    assert model, "the served model has an id"

    moderation = client.moderations.create(input=["win a free phone now!!!", "what time is it?"])
    assert moderation.id and moderation.model == model, moderation
    assert len(moderation.results) == 2, moderation
    for result in moderation.results:
        assert isinstance(result.flagged, bool), result
        categories = result.categories.model_dump() if hasattr(result.categories, "model_dump") else dict(result.categories)
        scores = result.category_scores.model_dump() if hasattr(result.category_scores, "model_dump") else dict(result.category_scores)
        assert "spam" in categories and "spam" in scores, (categories, scores)
        assert result.flagged == any(v for v in categories.values() if isinstance(v, bool)), result
    print("moderations ok")

    messages = [
        {"role": "system", "content": "Classify under the spam policy. Answer 0 or 1."},
        {"role": "user", "content": "win a free phone now!!!"},
    ]
    chat = client.chat.completions.create(model=model, messages=messages, reasoning_effort="low", max_tokens=8)
    choice = chat.choices[0]
    assert choice.message.role == "assistant", choice
    assert isinstance(choice.message.content, str), choice
    assert choice.finish_reason in ("stop", "length"), choice
    extra = choice.message.model_extra or {}
    assert "reasoning_content" in extra and "reasoning" in extra, extra
    assert chat.usage.prompt_tokens > 0 and chat.usage.total_tokens >= chat.usage.prompt_tokens, chat.usage
    print("chat ok")

    stream = client.chat.completions.create(
        model=model, messages=messages, reasoning_effort="low", max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )
    finish = None
    usage = None
    text = ""
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.prompt_tokens > 0, usage
    assert isinstance(text, str)
    print("stream ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
