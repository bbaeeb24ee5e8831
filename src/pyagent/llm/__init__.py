"""LLM backends behind one `Backend` protocol: embedded, OpenAI-compatible, replay."""
