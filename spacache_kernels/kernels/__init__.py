"""Raw Triton kernels and their launchers: tensors in, tensors out, no validation.

One module per kernel family. Inputs are validated by :mod:`spacache_kernels.ops`; call the ops
unless you know the launcher's contract.
"""
