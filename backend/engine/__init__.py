"""The engine: LLMEngine (schedule -> execute -> update -> outputs), the offline LLM API, output
processing and chat templates."""
