"""What runs on a device: layers (with kernels chosen once), Llama-family models, weight loading and the
sampler."""
