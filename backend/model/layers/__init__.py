"""Layers of the Llama-family models: attention over the paged KV cache, RMSNorm, rotary embedding."""
