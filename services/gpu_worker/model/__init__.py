"""The Llama model in plain PyTorch: config, weights, attention over the paged KV cache and the
LoRA layers that read adapter weights from the same pool."""
