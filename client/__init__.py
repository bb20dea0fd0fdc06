"""Pagetron clients: gRPC streaming client for the Triton `llm` model, liveness probe, serving benchmark.

Heavy imports (tritonclient, grpc) happen in the submodules, so importing the CLI hook stays cheap.
"""
