"""The engine's own paths, each checked against the reference: the folded reverse transformer and its step tables,
the fused sampling loop (CUDA graphs), the static-KV GPT-2 and its beam searches, the kernels a step launches,
static-shape buckets, and the torch.compile backend."""
