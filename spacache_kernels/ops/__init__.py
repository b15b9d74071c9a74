"""Public functional ops (autograd-free). Each takes ``backend="auto"|"triton"|"torch"``.

``ops.reference`` holds the pure-PyTorch definition of every op (the fallback and the test oracle).

Each public function validates its arguments, resolves the backend and calls its ``torch.library``
operator ``torch.ops.spacache.<name>`` (registered on import, see :mod:`._library`), so the ops can be
called inside ``torch.compile(fullgraph=True)`` functions and CUDA graph captures:

* ``apply_rope``, ``gather_linear``, ``gather_swiglu``, ``sparse_attention``, ``svd_proxy``,
  ``token_confidence``, ``rms_norm`` and ``scatter_residual`` (the latter mutating ``cache``) return
  new contiguous tensors;
* ``rms_norm_out`` (mutates ``out``) and ``scatter_residual_out`` (mutates ``cache`` and ``out``) serve
  the ``out=`` forms; ``scatter_rows_`` mutates ``cache``; ``proxy_select`` mutates ``proxy_cache``.

While ``torch.compile`` traces, the checks that read index values or data pointers are skipped (the
index value checks also while a CUDA graph is captured); everything else is still checked.
docs/architecture.md ("Ops as torch operators") has the schemas and how to use them.
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
