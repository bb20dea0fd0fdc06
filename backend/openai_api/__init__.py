"""The OpenAI-compatible HTTP API (FastAPI + uvicorn) in front of a Triton server serving `llm`/`embed`."""
