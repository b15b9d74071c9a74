"""Model adapters (LLaDA, Dream, Llama-family) and the cached-step runtime.

``load_model`` reads a checkpoint directory or an already-loaded HF module into a :class:`DiffusionLM`
(weights in the layout the kernels want, RoPE tables, a dense reference forward). The runtime module
(``spacache_kernels.models.runtime``) is not imported here: it pulls in the ops and policies.
``random_model`` builds one with random weights at a named shape (LLaDA-8B, Dream-7B, tiny CPU
variants; see ``spacache_kernels.models.synthetic``), for benchmarks.
"""

from spacache_kernels.models.config import ModelConfig
from spacache_kernels.models.loading import load_model
from spacache_kernels.models.model import DiffusionLM, LayerWeights
from spacache_kernels.models.rope import rope_tables
from spacache_kernels.models.synthetic import random_model

__all__ = ["DiffusionLM", "LayerWeights", "ModelConfig", "load_model", "random_model", "rope_tables"]
