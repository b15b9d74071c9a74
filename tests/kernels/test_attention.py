"""Kernel tests for the gathered-query attention and its probability-rows kernel, against the reference.

The reference itself is checked against ``torch.nn.functional.scaled_dot_product_attention`` (fp64,
boolean mask, kv heads repeated for GQA) and an explicit softmax. On the CPU the kernels run under
``TRITON_INTERPRET=1`` (tests/conftest.py) in fp32 and fp16; bf16 at real shapes runs only on a GPU
(``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spacache_kernels.kernels import attention as kernels
from spacache_kernels.ops import reference
from tests.helpers import poisoned, randn, tolerances

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(F16, id="fp16")]
PROB_TOL = dict(atol=1e-5, rtol=1e-4)  # fp32 softmax on both sides (inputs are upcast)


def left_padding(batch: int, length: int, pad_lengths, device="cpu") -> torch.Tensor:
    """(B, T) bool, True on the first ``pad_lengths[b]`` keys of row b (left-padded prompts)."""
    lengths = torch.tensor(pad_lengths, device=device).view(batch, 1)
    return torch.arange(length, device=device).view(1, length) < lengths


def make_inputs(batch, n_queries, q_heads, kv_heads, head_dim, length, dtype, device, *, seed=0, t_max=None):
    """q (B, S, Hq, Dh) and k/v caches as ``buffer[:, :T]`` slices of a longer (B, T_max, Hkv, Dh) buffer.

    The buffer tail past T is NaN: a kernel that reads it (or ignores the slice's strides) fails.
    """
    t_max = t_max or length + 7
    q = randn(batch, n_queries, q_heads, head_dim, dtype=dtype, device=device, seed=seed)
    buffers = []
    for i in (1, 2):
        buf = torch.full((batch, t_max, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
        buf[:, :length] = randn(batch, length, kv_heads, head_dim, dtype=dtype, device=device, seed=seed + i)
        buffers.append(buf)
    return q, buffers[0][:, :length], buffers[1][:, :length]


def direct_attention(q, k, v, key_padding, scale):
    """SDPA in fp64 with a boolean mask (True = attend) and repeated kv heads; all-padding rows -> 0."""
    group = q.shape[2] // k.shape[2]
    qd = q.double().transpose(1, 2)  # (B, Hq, S, Dh)
    kd = k.double().repeat_interleave(group, dim=2).transpose(1, 2)
    vd = v.double().repeat_interleave(group, dim=2).transpose(1, 2)
    mask = None
    if key_padding is not None:
        mask = (~key_padding)[:, None, None, :].expand(-1, q.shape[2], q.shape[1], -1)
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale).transpose(1, 2)
    if key_padding is not None:
        all_pad = key_padding.all(dim=1).view(-1, 1, 1, 1)
        out = torch.where(all_pad, torch.zeros_like(out), out)
    return out


def direct_probs(q, k, key_padding, scale, rows):
    """Explicit fp64 softmax rows ``softmax(q k^T * scale)`` at ``rows`` (B, m): (B, m, Hq, T)."""
    group = q.shape[2] // k.shape[2]
    kd = k.double().repeat_interleave(group, dim=2)
    sel = torch.stack([q[b, rows[b]] for b in range(q.shape[0])]).double()  # (B, m, Hq, Dh)
    logits = torch.einsum("bmhd,bthd->bmht", sel, kd) * scale
    if key_padding is not None:
        logits = logits.masked_fill(key_padding[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def run_kernels(q, k, v, key_padding, scale, prob_rows):
    """Both launchers into NaN-poisoned outputs: (out, lse, probs)."""
    b, s, hq, dh = q.shape
    out = poisoned(q.shape, q.dtype, q.device)
    lse = poisoned((b, hq, s), torch.float32, q.device)
    got = kernels.sparse_attention_fwd(q, k, v, key_padding, scale, out=out, lse_out=lse)
    assert got is out
    probs = poisoned((b, prob_rows.shape[1], hq, k.shape[1]), torch.float32, q.device)
    got = kernels.attention_row_probs(q, k, key_padding, lse, prob_rows, scale, out=probs)
    assert got is probs
    return out, lse, probs


# (B, S, Hq, Hkv, Dh, T, pad lengths per row or None)
SHAPES = [
    pytest.param(1, 1, 4, 2, 16, 1, None, id="B1-S1-gqa-Dh16-T1"),
    pytest.param(1, 1, 2, 2, 16, 1, [1], id="B1-S1-Dh16-T1-allpad"),
    pytest.param(3, 5, 4, 2, 32, 37, [0, 9, 37], id="B3-S5-gqa-Dh32-T37-leftpad"),
    pytest.param(3, 5, 4, 4, 64, 37, None, id="B3-S5-Dh64-T37"),
    pytest.param(2, 70, 2, 1, 64, 130, [3, 0], id="B2-S70-gqa-Dh64-T130-leftpad"),
    pytest.param(1, 9, 2, 2, 24, 256, [200], id="B1-S9-Dh24-T256-leftpad"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "n_queries", "q_heads", "kv_heads", "head_dim", "length", "pads"), SHAPES)
def test_kernel_matches_reference(batch, n_queries, q_heads, kv_heads, head_dim, length, pads, dtype, device):
    q, k, v = make_inputs(batch, n_queries, q_heads, kv_heads, head_dim, length, dtype, device, seed=length)
    key_padding = None if pads is None else left_padding(batch, length, pads, device)
    # Rows in shuffled order with a repeat: the probability rows are a gather, not a selection.
    rows = torch.stack(
        [torch.randint(0, n_queries, (4,), generator=torch.Generator().manual_seed(b)) for b in range(batch)]
    ).to(device)
    scale = head_dim**-0.5
    out, lse, probs = run_kernels(q, k, v, key_padding, scale, rows)
    ref_out, ref_probs = reference.sparse_attention(q, k, v, key_padding, None, rows)

    assert out.dtype == dtype and probs.dtype == torch.float32
    assert not out.isnan().any() and not probs.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out, ref_out, **tolerances(dtype))
    torch.testing.assert_close(probs, ref_probs, **PROB_TOL)
    if key_padding is not None:
        assert (probs.masked_select(key_padding[:, None, None, :].expand_as(probs)) == 0).all()
        dead = key_padding.all(dim=1)
        assert (out[dead] == 0).all(), "an all-padding row must be zeros"
        assert torch.isneginf(lse[dead]).all()
    live = probs.sum(-1)[~key_padding.all(dim=1)] if key_padding is not None else probs.sum(-1)
    torch.testing.assert_close(live, torch.ones_like(live), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_matches_logsumexp(dtype, device):
    batch, n_queries, q_heads, head_dim, length = 2, 17, 4, 32, 45
    q, k, v = make_inputs(batch, n_queries, q_heads, 2, head_dim, length, dtype, device, seed=3)
    key_padding = left_padding(batch, length, [5, 0], device)
    scale = 0.3
    lse = poisoned((batch, q_heads, n_queries), torch.float32, device)
    kernels.sparse_attention_fwd(q, k, v, key_padding, scale, lse_out=lse)
    kd = k.float().repeat_interleave(2, dim=2)
    logits = torch.einsum("bshd,bthd->bhst", q.float(), kd) * scale
    logits = logits.masked_fill(key_padding[:, None, None, :], float("-inf"))
    expect = torch.logsumexp(logits, dim=-1) / torch.log(torch.tensor(2.0))  # base 2
    torch.testing.assert_close(lse, expect, atol=1e-5, rtol=1e-5)


def test_padding_slots_with_garbage_are_not_read(device):
    """Padded cache slots of a preallocated buffer may hold anything (even NaN): they must not leak."""
    batch, n_queries, heads, head_dim, length = 2, 6, 2, 32, 40
    q, k, v = make_inputs(batch, n_queries, heads, heads, head_dim, length, F32, device, seed=5)
    key_padding = left_padding(batch, length, [11, 0], device)
    clean_k, clean_v = k.clone(), v.clone()
    k[key_padding] = float("nan")
    v[key_padding] = float("inf")
    rows = torch.tensor([[0, 5], [2, 3]], device=device)
    out, _, probs = run_kernels(q, k, v, key_padding, head_dim**-0.5, rows)
    ref_out, ref_probs = reference.sparse_attention(q, clean_k, clean_v, key_padding, None, rows)
    torch.testing.assert_close(out, ref_out, **tolerances(F32))
    torch.testing.assert_close(probs, ref_probs, **PROB_TOL)


def test_strided_query_and_custom_scale(device):
    """q as a (B, Hq, S, Dh) tensor seen through transpose(1, 2); a non-default scale."""
    batch, n_queries, q_heads, head_dim, length = 2, 19, 4, 16, 50
    q_bhsd = randn(batch, q_heads, n_queries, head_dim, device=device, seed=11)
    q = q_bhsd.transpose(1, 2)
    assert not q.is_contiguous()
    _, k, v = make_inputs(batch, 1, q_heads, 1, head_dim, length, F32, device, seed=12)
    out, probs = kernels.sparse_attention(q, k, v, None, 0.05, torch.tensor([[18], [0]], device=device))
    ref_out, ref_probs = reference.sparse_attention(
        q, k, v, None, 0.05, torch.tensor([[18], [0]], device=device)
    )
    torch.testing.assert_close(out, ref_out, **tolerances(F32))
    torch.testing.assert_close(probs, ref_probs, **PROB_TOL)
    # The scale matters: the default one gives a different answer.
    default_out, _ = reference.sparse_attention(q, k, v, None, None, None)
    assert not torch.allclose(out, default_out, atol=1e-3)


def test_empty_queries_give_empty_outputs(device):
    q, k, v = make_inputs(2, 0, 4, 2, 16, 10, F32, device)
    rows = torch.zeros((2, 0), dtype=torch.int64, device=device)
    out, probs = kernels.sparse_attention(q, k, v, None, None, rows)
    assert out.shape == (2, 0, 4, 16) and probs.shape == (2, 0, 4, 10)
    out, probs = kernels.sparse_attention(q, k, v, None, None, None)
    assert out.shape == (2, 0, 4, 16) and probs is None


def test_no_prob_rows_returns_none(device):
    q, k, v = make_inputs(1, 3, 2, 2, 16, 20, F32, device, seed=2)
    out, probs = kernels.sparse_attention(q, k, v, None, None, None)
    assert probs is None
    torch.testing.assert_close(out, reference.sparse_attention(q, k, v)[0], **tolerances(F32))


# --------------------------------------------------------------------------------------------
# the reference against a direct computation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("batch", "n_queries", "q_heads", "kv_heads", "head_dim", "length", "pads"),
    [(1, 1, 4, 2, 16, 1, None), (3, 5, 4, 2, 32, 37, [0, 9, 37]), (2, 8, 6, 3, 20, 23, [4, 22])],
    ids=["B1-S1-T1", "B3-S5-T37-allpad-row", "B2-S8-Hq6-Hkv3"],
)
def test_reference_matches_sdpa(batch, n_queries, q_heads, kv_heads, head_dim, length, pads):
    q, k, v = make_inputs(batch, n_queries, q_heads, kv_heads, head_dim, length, F32, "cpu", seed=head_dim)
    key_padding = None if pads is None else left_padding(batch, length, pads)
    rows = torch.stack([torch.arange(min(3, n_queries)).flip(0) for _ in range(batch)])
    scale = head_dim**-0.5
    out, probs = reference.sparse_attention(q, k, v, key_padding, None, rows)
    torch.testing.assert_close(
        out, direct_attention(q, k, v, key_padding, scale).float(), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        probs, direct_probs(q, k, key_padding, scale, rows).float(), atol=1e-6, rtol=1e-5
    )


# --------------------------------------------------------------------------------------------
# real shapes (GPU only)
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("batch", "n_queries", "length"),
    [(1, 64, 512), (16, 256, 1024), (16, 64, 1024), (1, 256, 512)],
    ids=["B1-S64-T512", "B16-S256-T1024", "B16-S64-T1024", "B1-S256-T512"],
)
@pytest.mark.parametrize("kv_heads", [32, 8], ids=["mha", "gqa4"])
def test_real_shapes_bf16(batch, n_queries, length, kv_heads, device):
    q_heads, head_dim = 32, 128
    q, k, v = make_inputs(
        batch, n_queries, q_heads, kv_heads, head_dim, length, BF16, device, t_max=length + 256
    )
    pads = [(37 * b) % 300 for b in range(batch)]
    key_padding = left_padding(batch, length, pads, device)
    rows = torch.stack([torch.tensor([0, n_queries - 1, n_queries // 2]) for _ in range(batch)]).to(device)
    out, probs = kernels.sparse_attention(q, k, v, key_padding, None, rows)
    ref_out, ref_probs = reference.sparse_attention(q, k, v, key_padding, None, rows)
    torch.testing.assert_close(out, ref_out, **tolerances(BF16))
    torch.testing.assert_close(probs, ref_probs, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-2, rtol=0)
