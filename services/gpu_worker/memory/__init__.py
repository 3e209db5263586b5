"""The unified memory pool (S-LoRA's unified paging): one slot array for KV cache and adapter
weights, its allocator, and the resident adapters with the tables the kernels read."""
