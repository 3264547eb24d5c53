"""LWM: Large World Model on current JAX (RingAttention, Pallas kernels, VQGAN, packing)."""

__version__ = "0.2.0"
