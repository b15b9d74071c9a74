"""spacache_kernels: fused Triton kernels, model adapters and caching policies for diffusion LMs."""

__version__ = "0.1.0"
