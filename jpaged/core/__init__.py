"""Host side of the engine: sequences, the block manager (with its allocation policy, prefix
cache and swap space) and the scheduler. Plain Python and numpy: nothing here imports jax."""
