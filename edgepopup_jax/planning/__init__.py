"""Planning and running experiments: sweeps over grids of runs with their tables and figures,
the paper's figures as grids, and preflight (deviceless compiles of a config for a TPU or GPU
target: memory, FLOPs, the largest batch or group that fits). The top layer: it drives the
trainer and may import anything below it."""
