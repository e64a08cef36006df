"""Device side of a step: the input builder (host arrays padded to buckets), the sampling
tensors, the model runner (weights, the KV pool, the jitted step), the sampler, and the
whole-block copies and swaps."""
