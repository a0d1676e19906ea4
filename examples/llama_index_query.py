"""A LlamaIndex query engine over a small handbook, with echo-middleware as ``Settings.llm`` and a local embedding
model: repeated or paraphrased questions are answered by the small model with past answers as examples.

Run: ``python examples/llama_index_query.py`` (the bundled models: ``echo-middleware models fetch``). For a quick
run on the tiny model: ``ECHO_LARGE__MODEL=smollm2-135m-instruct ECHO_SMALL__MODEL=smollm2-135m-instruct``.
"""

# %%
from pathlib import Path

from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex

from echo_middleware.integrations.llama_index import DecisionLog, EchoEmbedding, EchoLLM

DATA = Path(__file__).parent / "data" if "__file__" in globals() else Path("data")
QUESTIONS = [
    "How often is the production database backed up?",
    "Who should I page when the site is down at night?",
    "How often is the production database backed up?",  # asked again
    "How frequently do we back up the production database?",  # paraphrased
]


# %%
def main() -> None:
    Settings.llm = EchoLLM.from_defaults(max_tokens=96, tenant="examples")  # instead of OpenAI(...)
    Settings.embed_model = EchoEmbedding()  # local sentence embedder: no network, no API key
    documents = SimpleDirectoryReader(str(DATA), required_exts=[".md"]).load_data()
    engine = VectorStoreIndex.from_documents(documents).as_query_engine(similarity_top_k=1)
    decisions = DecisionLog.attach()  # query engines hide the LLM response; its decisions arrive as events
    for question in QUESTIONS:
        answer = engine.query(question)
        d = decisions.last
        used = ", ".join(f"{e['id'][:8]} (distance {e['distance']:.2f})" for e in d["examples"])
        route = f"OFFLOADED to the small model with examples {used}" if d["offloaded"] else "large model"
        print(f"Q: {question}\n   -> {route}\n      why: {d['reason']}\n   A: {' '.join(str(answer).split())[:110]}")
    Settings.llm.close()


# %%
if __name__ == "__main__":
    main()
