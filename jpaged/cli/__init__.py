"""The `jpaged` command line: `generate`, `chat`, `serve` and `bench` (`main.py` wires them).
It sits on top of everything, the benchmarks included."""
