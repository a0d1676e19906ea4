"""A LangChain LCEL chain on echo-middleware: one changed line, and repeated or paraphrased questions get
answered by the small model with past answers as in-context examples. Each answer prints its routing decision.

Run: ``python examples/langchain_chain.py`` (the bundled models: ``echo-middleware models fetch``). For a quick
run on the tiny model: ``ECHO_LARGE__MODEL=smollm2-135m-instruct ECHO_SMALL__MODEL=smollm2-135m-instruct``.
"""

# %%
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from echo_middleware.integrations.langchain import EchoChatModel

QUESTIONS = [
    "How do I reverse a list in Python?",
    "What does the git stash command do?",
    "How do I reverse a list in Python?",  # asked again
    "What is the way to reverse a Python list?",  # paraphrased
    "What does `git stash` do?",  # paraphrased
]


# %%
def main() -> None:
    llm = EchoChatModel.from_defaults(max_tokens=96, tenant="examples")  # instead of ChatOpenAI(...)
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in at most two sentences."), ("human", "{q}")])
    chain = prompt | llm | {"answer": StrOutputParser(), "decision": lambda m: m.response_metadata["decision"]}
    for question in QUESTIONS:
        out = chain.invoke({"q": question})
        d = out["decision"]
        used = ", ".join(f"{e['id'][:8]} (distance {e['distance']:.2f})" for e in d["examples"])
        route = f"OFFLOADED to the small model with examples {used}" if d["offloaded"] else "large model"
        print(f"Q: {question}\n   -> {route}\n      why: {d['reason']}\n   A: {' '.join(out['answer'].split())[:110]}")
    llm.close()


# %%
if __name__ == "__main__":
    main()
