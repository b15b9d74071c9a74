"""Public functional ops (autograd-free). Each takes ``backend="auto"|"triton"|"torch"``.

``ops.reference`` holds the pure-PyTorch definition of every op (the fallback and the test oracle).
"""

from spacache_kernels.ops._dispatch import default_backend, resolve_backend
from spacache_kernels.ops.attention import sparse_attention
from spacache_kernels.ops.confidence import token_confidence
from spacache_kernels.ops.linear import gather_linear, gather_swiglu
from spacache_kernels.ops.norm import rms_norm
from spacache_kernels.ops.proxy import proxy_select, svd_proxy
from spacache_kernels.ops.rope import apply_rope
from spacache_kernels.ops.scatter import scatter_residual, scatter_rows_

__all__ = [
    "apply_rope",
    "default_backend",
    "gather_linear",
    "gather_swiglu",
    "proxy_select",
    "resolve_backend",
    "rms_norm",
    "scatter_residual",
    "scatter_rows_",
    "sparse_attention",
    "svd_proxy",
    "token_confidence",
]
