"""echo-middleware: faster, cheaper LLM applications with the same answers.

Past question/answer pairs become in-context examples for a small local model; a router decides per request
whether the small model with those examples answers as well as the large one. See README.md and docs/.
"""

__version__ = "0.1.0"
