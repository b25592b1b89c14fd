"""locopilot: one OpenAI- and Ollama-compatible endpoint over embedded llama.cpp and other backends."""

__version__ = "0.1.0"
