"""The README's op example, at interpreter-sized shapes on the CPU."""

import torch

from spacache_kernels.ops import gather_linear, proxy_select, reference, svd_proxy


def test_readme_op_example_runs_and_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, L, d, r, k = 2, 32, 48, 16, 8
    hidden = torch.randn(B, L, d, generator=g)
    proj = svd_proxy(torch.randn(24, d, generator=g), rank=r)
    proxy_cache = torch.randn(B, L, r, generator=g)
    ref_cache = proxy_cache.clone()
    update_idx, scores = proxy_select(hidden, proj, proxy_cache, k)
    want_idx, want_scores = reference.proxy_select(hidden, proj, ref_cache, k)
    assert torch.equal(update_idx, want_idx)
    w_q = torch.randn(40, d, generator=g)
    q_sel = gather_linear(hidden, update_idx, w_q)
    torch.testing.assert_close(q_sel, reference.gather_linear(hidden, update_idx, w_q), atol=1e-4, rtol=1e-4)


def test_package_generate_is_the_function_even_after_the_submodule_import():
    import spacache_kernels.generation  # noqa: F401  (binds the submodule first)
    from spacache_kernels import generate

    assert callable(generate) and generate.__name__ == "generate"
