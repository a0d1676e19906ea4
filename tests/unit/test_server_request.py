"""The HTTP front door turns OpenAI request bodies into pipeline requests, refusing what it cannot honour."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from echo_middleware.server import ChatCompletionIn


def test_openai_body_becomes_an_echo_request() -> None:
    body = ChatCompletionIn.model_validate(
        {
            "model": "echo",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 32,
            "temperature": 0.2,
            "stop": "###",
            "echo": {"tenant": "acme", "offload": "never", "slo": {"latency_s": 2.0, "priority": "interactive"}},
        }
    )
    request = body.to_request(tenant_header="ignored-when-body-names-one")
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi there")]
    assert request.params.max_tokens == 32
    assert request.params.stop == ["###"]
    assert request.tenant == "acme"
    assert request.offload == "never"
    assert request.slo is not None
    assert request.slo.priority == "interactive"
    assert not request.requires_large


def test_tenant_header_and_tools_force_the_large_model() -> None:
    body = ChatCompletionIn.model_validate(
        {"messages": [{"role": "user", "content": "weather?"}], "tools": [{"type": "function"}]}
    )
    request = body.to_request(tenant_header="from-header")
    assert request.tenant == "from-header"
    assert request.requires_large


def test_json_response_format_forces_the_large_model() -> None:
    body = ChatCompletionIn.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}
    )
    assert body.to_request(None).requires_large
    plain = ChatCompletionIn.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text"}}
    )
    assert not plain.to_request(None).requires_large


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 2), ("temperature", 3.0), ("messages", []), ("max_tokens", 0)],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], field: value}
    with pytest.raises(ValidationError) as info:
        ChatCompletionIn.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == field


def test_unknown_echo_option_is_refused() -> None:
    with pytest.raises(ValidationError, match="tenantt"):
        ChatCompletionIn.model_validate({"messages": [{"role": "user", "content": "x"}], "echo": {"tenantt": "a"}})
