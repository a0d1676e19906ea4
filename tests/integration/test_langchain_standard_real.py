"""langchain-tests' standard integration suite for EchoChatModel, on the real pipeline and real local models.

SmolLM2-135M-Instruct is both the small and the large model (transformers engine, for speed), with a fresh
embedded Chroma store; one pipeline serves every test (the suite builds a new EchoChatModel per test around it).
``max_tokens`` is 48 instead of the suite's 100 to keep the run short on a CPU.

Expected failures, and why (``xfail``, not strict: a lucky answer may pass):

- Tool calling and structured output (``test_tool_calling`` x2, ``test_tool_calling_async``, ``test_tool_choice``,
  ``test_tool_calling_with_no_arguments``, ``test_bind_runnables_as_tools``, ``test_structured_output`` x3,
  ``test_structured_output_async`` x3, ``test_structured_output_pydantic_2_v1``,
  ``test_structured_output_optional_param``, ``test_agent_loop`` x2, ``test_unicode_tool_call_integration``):
  17 cases. SmolLM2 answers in prose instead of a call (seen: "The value of magic_function(3) is 3."). The
  adapter's side works (tools are offered to the large engine in the ``<tool_call>`` format and its answer is
  parsed; see tests/integration/test_integration_tools.py, where Qwen2.5-Coder-0.5B makes real tool calls and
  structured output), but a 135M model does not reliably emit a well-formed call with the right arguments.
  Tool tests that only need an answer to a tool history pass (``test_tool_message_histories_*``,
  ``test_tool_message_error_status``, ``test_structured_few_shot_examples``).

Skipped by the suite itself (the properties say the model lacks the feature): image, audio, PDF, JSON mode,
Anthropic-format inputs, VCR timing, model override (one EchoChatModel serves a fixed pipeline, whose engines are
chosen in its settings; ``model=`` names the model in traces only).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from echo_middleware.integrations.langchain import EchoChatModel
from echo_middleware.pipeline import EchoPipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {"backend": "transformers", "model": "smollm2-135m-instruct"}
SMALL_MODEL_REASON = (
    "SmolLM2-135M (the CI model) does not reliably emit well-formed tool calls with correct arguments; the "
    "tool path itself is tested with Qwen2.5-Coder-0.5B in test_integration_tools.py"
)

_state: dict[str, EchoPipeline] = {}


@pytest.fixture(scope="module", autouse=True)
def shared_pipeline(
    tiny_model_dir: Path, embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EchoPipeline]:
    pipeline = EchoPipeline.from_defaults(
        large=TINY, small=TINY, store={"path": str(tmp_path_factory.mktemp("lc-standard-store"))}
    )
    _state["pipeline"] = pipeline
    yield pipeline
    pipeline.close_sync()
    _state.clear()


xfail_small_model = pytest.mark.xfail(reason=SMALL_MODEL_REASON, strict=False)


class TestEchoChatModelIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[EchoChatModel]:
        return EchoChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"pipeline": _state["pipeline"], "model": "echo-smollm2", "max_tokens": 48}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # ----------------------------------------------------------------- tool calls on a 135M model

    @xfail_small_model
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @xfail_small_model
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @xfail_small_model
    def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
        super().test_bind_runnables_as_tools(model)

    @xfail_small_model
    def test_tool_choice(self, model: BaseChatModel) -> None:
        super().test_tool_choice(model)

    @xfail_small_model
    def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @xfail_small_model
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(
        self, model: BaseChatModel, schema_type: Literal["pydantic", "typeddict", "json_schema"]
    ) -> None:
        super().test_structured_output(model, schema_type)

    @xfail_small_model
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(
        self, model: BaseChatModel, schema_type: Literal["pydantic", "typeddict", "json_schema"]
    ) -> None:
        await super().test_structured_output_async(model, schema_type)

    @xfail_small_model
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @xfail_small_model
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    @xfail_small_model
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @xfail_small_model
    def test_unicode_tool_call_integration(self, model: BaseChatModel) -> None:
        super().test_unicode_tool_call_integration(model)
