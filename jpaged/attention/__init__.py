"""Paged attention: the metadata every backend reads, the backend contract, one file per
backend (`xla`, `reference`, `cpu` with its C++ source in `csrc/`, `pallas`) and the selector."""
