"""langchain-tests' standard unit suite for EchoChatModel (pinned: langchain-tests 1.1.x).

Nothing here loads a model: the unit suite constructs models and checks parameters, tool binding and structured
output wiring. What is skipped, and why:

- ``api_key`` is dropped from the standard parameters: echo-middleware runs local models and has no key; a
  wrapped large model (``large=ChatOpenAI(...)``) carries its own.
- ``test_serdes``: skipped by the suite itself, EchoChatModel is not LangChain-serialisable (it holds a pipeline).
- ``test_init_from_env``: skipped by the suite; settings come from ``ECHO_*`` variables through EchoSettings,
  which tests/unit/test_config.py covers.
"""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from echo_middleware.integrations.langchain import EchoChatModel


class TestEchoChatModelStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[EchoChatModel]:
        return EchoChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "echo-test", "tenant": "standard-tests"}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        params = super().standard_chat_model_params
        params.pop("api_key", None)
        return params
