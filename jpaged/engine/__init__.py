"""The engine: the engine core's step loop, and the host-side processing around it (input
processing, output processing with incremental detokenization, beam search, stats)."""
