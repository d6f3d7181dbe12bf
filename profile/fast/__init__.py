"""Fast decode engine: compact model, static KV cache, CUDA-graph decode step."""
