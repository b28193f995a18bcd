"""The library: edge-popup's masks, the Linen and NNX layers built on them, their options and
weight inits, the batched mask selection and a per-layer summary. Needs nothing but JAX, Flax,
optax and numpy; it imports no other part of the package (the bottom layer, see
docs/ARCHITECTURE.md and tests/test_layering.py)."""
