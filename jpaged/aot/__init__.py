"""Ahead-of-time compilation of the engine's whole step from abstract shapes, for the local
backend or for an NVIDIA GPU this machine does not have (`targets`), and what the compiled
program costs (`hlo_cost`). Import from the submodules: `jpaged.aot.step`,
`jpaged.aot.targets`, `jpaged.aot.hlo_cost`."""
