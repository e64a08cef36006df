"""CPU kernels through XLA's FFI that are not attention: the shared C++ build (`build.py`)
and the packed-weight matmul of small-row steps (`matmul.py`)."""
