"""The ``spacache`` torch.library operators behind the public ops.

* ``torch.library.opcheck`` (all four of its tests: schema and mutation declarations, autograd
  registration, fake implementation, AOT dispatch with dynamic shapes) on every operator, on fresh
  random inputs of odd sizes: torch backend on the CPU, and the triton backend (under the interpreter
  on the CPU, where every operator passes all four).
* The fake implementations against real outputs: shapes, dtypes and strides, also for strided inputs.
* Public ops inside ``torch.compile(fullgraph=True)`` (``aot_eager``; one small case through
  ``inductor``): one graph holding the operators, equal to eager, the in-place ops really mutating
  their arguments, no recompilation per budget or seed; a CUDA graph capture on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from spacache_kernels import ops
from spacache_kernels.ops import reference

# Every operator of the namespace, by the public function that calls it.
OPERATORS = {
    "apply_rope": ("apply_rope",),
    "gather_linear": ("gather_linear",),
    "gather_swiglu": ("gather_swiglu",),
    "proxy_select": ("proxy_select",),
    "rms_norm": ("rms_norm", "rms_norm_out"),
    "scatter_residual": ("scatter_residual", "scatter_residual_out"),
    "scatter_rows_": ("scatter_rows_",),
    "sparse_attention": ("sparse_attention",),
    "svd_proxy": ("svd_proxy",),
    "token_confidence": ("token_confidence",),
}
MUTATED = {  # operator -> the arguments its schema declares written
    "proxy_select": {"proxy_cache"},
    "rms_norm_out": {"out"},
    "scatter_residual": {"cache"},
    "scatter_residual_out": {"cache", "out"},
    "scatter_rows_": {"cache"},
}


def _op(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.spacache, name).default


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    # Never zeros: a kernel that wrote nothing into a zero-initialised buffer would pass.
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _rand_idx(gen, batch: int, count: int, length: int, *, distinct: bool, device="cpu", dtype=torch.int64):
    if distinct:
        rows = [torch.randperm(length, generator=gen)[:count] for _ in range(batch)]
        idx = torch.stack(rows)
    else:
        idx = torch.randint(0, length, (batch, count), generator=gen)
    return idx.to(device=device, dtype=dtype)


def _rope_tables(n_pos: int, head_dim: int, device="cpu"):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(device), ang.sin().to(device)


def _cases(backend: str, device) -> list[tuple[str, str, tuple]]:
    """(case id, operator name, args) for every operator and its argument variants (odd sizes)."""
    g = _gen(1234)
    r = lambda *s: _randn(g, *s, device=device)  # noqa: E731
    cos, sin = _rope_tables(11, 6, device)
    b, length, d = 2, 7, 9
    cases = [
        (
            "rope",
            "apply_rope",
            (r(b, 5, 3, 6), _rand_idx(g, b, 5, 11, distinct=False, device=device), cos, sin),
        ),
        ("rms_norm", "rms_norm", (r(3, 5, 11), r(11), 1e-5)),
        ("rms_norm_out", "rms_norm_out", (r(3, 5, 11), r(11), 1e-5, r(3, 5, 11))),
        ("svd_proxy", "svd_proxy", (r(10, 13), 3, torch.float32)),
    ]
    x, idx = r(b, length, d), _rand_idx(g, b, 5, length, distinct=False, device=device)
    pos = _rand_idx(g, b, 5, 11, distinct=False, device=device)
    impls = ("fused", "torch_gather") if backend == "triton" else ("fused",)
    for impl in impls:
        w12, w18 = r(12, d), r(18, d)
        cases += [
            # gather_linear(x, idx, weight, bias, cos, sin, positions, rope_cols, [backend,] impl)
            (f"linear_bias_{impl}", "gather_linear", (x, idx, w12, r(12), None, None, None, None, impl)),
            (f"linear_all_rows_{impl}", "gather_linear", (x, None, w12, None, None, None, None, None, impl)),
            (f"linear_rope_pos_{impl}", "gather_linear", (x, idx, w12, r(12), cos, sin, pos, None, impl)),
            (f"linear_rope_idx_{impl}", "gather_linear", (x, idx, w18, None, cos, sin, None, None, impl)),
            (f"linear_rope_cols_{impl}", "gather_linear", (x, idx, w18, r(18), cos, sin, pos, 6, impl)),
            (f"swiglu_{impl}", "gather_swiglu", (x, idx, r(10, d), r(10, d), impl)),
            (f"swiglu_all_rows_{impl}", "gather_swiglu", (x, None, r(10, d), r(10, d), impl)),
        ]
    for select in ("kernel", "torch") if backend == "triton" else ("torch",):
        cases.append((f"proxy_select_{select}", "proxy_select", (r(b, 9, d), r(d, 5), r(b, 9, 5), 4, select)))
    sel = _rand_idx(g, b, 4, length, distinct=True, device=device)
    cases += [
        ("scatter_rows_", "scatter_rows_", (r(b, length, 6), sel, r(b, 4, 6))),
        ("scatter_residual", "scatter_residual", (r(b, length, 6), r(b, length, 6), sel, r(b, 4, 6))),
        (
            "scatter_residual_out",
            "scatter_residual_out",
            (r(b, length, 6), r(b, length, 6), sel, r(b, 4, 6), r(b, length, 6)),
        ),
    ]
    q, kc, vc = r(b, 5, 4, 8), r(b, 7, 2, 8), r(b, 7, 2, 8)
    pad = torch.tensor([[False, False, True, False, False, False, True], [False] * 6 + [True]], device=device)
    rows = _rand_idx(g, b, 3, 5, distinct=False, device=device)
    cases += [
        ("attention", "sparse_attention", (q, kc, vc, None, None, None)),
        ("attention_pad_probs", "sparse_attention", (q, kc, vc, pad, 0.3, rows)),
    ]
    hidden, head = r(b, length, d), r(13, d)
    positions = _rand_idx(g, b, 3, length, distinct=False, device=device)
    row_seeds = torch.tensor([5, 2**32 - 3], device=device)
    cases += [
        ("confidence_argmax", "token_confidence", (hidden, head, positions, 0.0, 0, None, None)),
        ("confidence_all_rows", "token_confidence", (hidden, head, None, 0.0, 0, None, 4)),
        ("confidence_sample", "token_confidence", (hidden, head, positions, 0.7, 12345, None, 2)),
        ("confidence_row_seeds", "token_confidence", (hidden, head, positions, 1.3, 0, row_seeds, None)),
    ]
    # Append the backend where the schema has it (before gather_linear's / gather_swiglu's impl and
    # proxy_select's select, which come last).
    out = []
    for case_id, name, args in cases:
        if name in ("gather_linear", "gather_swiglu", "proxy_select"):
            args = (*args[:-1], backend, args[-1])
        elif name != "svd_proxy":
            args = (*args, backend)
        out.append((case_id, name, args))
    return out


def _case_params(backend: str, device):
    return [pytest.param(name, args, id=case_id) for case_id, name, args in _cases(backend, device)]


def test_every_public_op_has_an_operator():
    public = set(ops.__all__) - {"default_backend", "resolve_backend"}
    assert public == set(OPERATORS)
    for names in OPERATORS.values():
        for name in names:
            op = _op(name)
            written = {
                a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write
            }
            assert written == MUTATED.get(name, set()), name
    covered = {name for _, name, _ in _cases("torch", "cpu")}
    assert covered == {n for names in OPERATORS.values() for n in names}


@pytest.mark.parametrize(("name", "args"), _case_params("torch", "cpu"))
def test_opcheck_torch_backend(name, args):
    torch.library.opcheck(_op(name), args)


# Under the interpreter the kernels run on the CPU; every opcheck test applies (the launchers only
# allocate, read shapes and strides and launch, and the fakes never reach them).
@pytest.mark.parametrize(
    ("name", "args"), _case_params("triton", "cuda" if torch.cuda.is_available() else "cpu")
)
def test_opcheck_triton_backend(name, args):
    torch.library.opcheck(_op(name), args)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims' strides swapped (not contiguous)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fake_matches_real_outputs(backend, layout):
    """Meta outputs (the fake implementation) have the real outputs' shapes, dtypes and strides, also
    for strided read-only inputs (the references follow an input's layout; the operators must not)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case_id, name, args in _cases(backend, device):
        written = {
            i for i, a in enumerate(_op(name)._schema.arguments) if a.alias_info and a.alias_info.is_write
        }
        if layout == "strided":
            args = tuple(
                _column_major(a)
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 2 and i not in written
                else a
                for i, a in enumerate(args)
            )
        real = _op(name)(*[a.clone() if i in written else a for i, a in enumerate(args)])
        meta = _op(name)(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        real = real if isinstance(real, tuple) else (real,)
        meta = meta if isinstance(meta, tuple) else (meta,)
        assert len(real) == len(meta), case_id
        for got, want in zip(meta, real):
            if want is None:
                assert got is None, case_id
                continue
            assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride()), case_id


def test_operator_rejects_an_unresolved_backend():
    x, w = torch.randn(2, 3), torch.randn(3)
    with pytest.raises(ValueError, match="backend"):
        _op("rms_norm")(x, w, 1e-5, "auto")


def test_public_ops_return_contiguous_for_strided_inputs():
    """The torch backend's reference may follow an input's layout; the operator promises contiguous."""
    g = _gen(5)
    q = _randn(g, 2, 6, 4, 8).transpose(1, 2)  # (B, Hq, S, Dh) storage viewed as (B, S, Hq, Dh)
    kc = _randn(g, 2, 3, 7, 8).transpose(1, 2)
    out, probs = ops.sparse_attention(q, kc, kc, backend="torch")
    assert probs is None and out.is_contiguous()
    want, _ = reference.sparse_attention(q, kc, kc)
    torch.testing.assert_close(out, want)
    x = _randn(g, 11, 5).T
    assert ops.rms_norm(x, _randn(g, 11), backend="torch").is_contiguous()


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
B, L, D, HQ, HKV, DH = 2, 9, 12, 4, 2, 4


def _layer_inputs(seed: int, device) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    cos, sin = _rope_tables(L, DH)
    tensors = {
        "x": _randn(g, B, L, D),
        "w_norm": _randn(g, D),
        "w_v": _randn(g, HKV * DH, D),
        "proxy_cache": _randn(g, B, L, 4),
        "w_q": _randn(g, HQ * DH, D),
        "w_k": _randn(g, HKV * DH, D),
        "b_k": _randn(g, HKV * DH),
        "w_o": _randn(g, D, HQ * DH),
        "w_gate": _randn(g, 10, D),
        "w_up": _randn(g, 10, D),
        "w_down": _randn(g, D, 10),
        "branch": _randn(g, B, L, D),
        "k_cache": _randn(g, B, L, HKV * DH),
        "lm_head": _randn(g, 13, D),
        "cos": cos,
        "sin": sin,
        "key_padding": torch.tensor([[False] * (L - 2) + [True] * 2, [False] * L]),
        "prob_rows": torch.tensor([[0, 2], [1, 1]]),  # rows of the S = 3 selected queries
    }
    return {name: t.to(device) for name, t in tensors.items()}


def _layer(t: dict[str, torch.Tensor], backend: str):
    """A SPA-Cache-like cached layer built from the public ops (every op, default index checks)."""
    h = ops.rms_norm(t["x"], t["w_norm"], backend=backend)
    proj = ops.svd_proxy(t["w_v"], 4)
    sel, scores = ops.proxy_select(h, proj, t["proxy_cache"], 3, backend=backend)
    rope = (t["cos"], t["sin"])
    q = ops.gather_linear(h, sel, t["w_q"], backend=backend).view(B, 3, HQ, DH)
    q = ops.apply_rope(q, sel, t["cos"], t["sin"], backend=backend)
    k_new = ops.gather_linear(h, sel, t["w_k"], t["b_k"], rope=rope, backend=backend)
    ops.scatter_rows_(t["k_cache"], sel, k_new, backend=backend)
    k = t["k_cache"].view(B, L, HKV, DH)
    attn, probs = ops.sparse_attention(q, k, k, t["key_padding"], prob_rows=t["prob_rows"], backend=backend)
    o = ops.gather_linear(attn.reshape(B, 3, HQ * DH), None, t["w_o"], backend=backend)
    f = ops.gather_linear(
        ops.gather_swiglu(o, None, t["w_gate"], t["w_up"], backend=backend),
        None,
        t["w_down"],
        backend=backend,
    )
    y = ops.scatter_residual(t["x"], t["branch"], sel, o + f, backend=backend)
    ops.rms_norm(y, t["w_norm"], out=y, backend=backend)  # in place
    token, conf = ops.token_confidence(
        y, t["lm_head"], sel, temperature=0.8, seed=7, suppress_token=0, backend=backend
    )
    return sel, scores, probs, y, token, conf


def _run(fn, seed: int, backend: str, device):
    t = _layer_inputs(seed, device)
    return fn(t, backend), t


def _assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_layer_is_one_graph_equal_to_eager(backend, device):
    eager, t_eager = _run(_layer, 0, backend, device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled, t_comp = _run(torch.compile(_layer, backend=counter, fullgraph=True), 0, backend, device)
    assert counter.frame_count == 1
    called = {n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"}
    names = {c.name() for c in called if isinstance(c, torch._ops.OpOverload)}
    expected = {f"spacache::{n}" for n in (*OPERATORS, "rms_norm_out")}
    assert expected <= names, expected - names
    _assert_same(compiled, eager)
    # The mutated inputs match as well: proxy cache, K cache and branch cache.
    for key in ("proxy_cache", "k_cache", "branch", "x"):
        torch.testing.assert_close(t_comp[key], t_eager[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_ops_mutate_under_compile(backend, device):
    """scatter_rows_, scatter_residual (cache; out=x), proxy_select (proxy cache), rms_norm(out=x) write."""
    g = _gen(9)
    cache, src = _randn(g, 2, 7, 5, device=device), _randn(g, 2, 3, 5, device=device)
    idx = _rand_idx(g, 2, 3, 7, distinct=True, device=device)
    x, w = _randn(g, 2, 7, 5, device=device), _randn(g, 5, device=device)
    hidden, proj, proxy_cache = (
        _randn(g, 2, 7, 6, device=device),
        _randn(g, 6, 3, device=device),
        _randn(g, 2, 7, 3, device=device),
    )
    branch, branch_src = _randn(g, 2, 7, 5, device=device), _randn(g, 2, 3, 5, device=device)
    stream, branch2 = _randn(g, 2, 7, 5, device=device), _randn(g, 2, 7, 5, device=device)

    want_cache = reference.scatter_rows_(cache.clone(), idx, src)
    want_x = reference.rms_norm(x, w, 1e-5)
    want_proxy = (hidden @ proj).clone()
    want_branch = reference.scatter_rows_(branch.clone(), idx, branch_src)
    want_y = x + want_branch
    want_branch2 = reference.scatter_rows_(branch2.clone(), idx, src)
    want_stream = stream + want_branch2

    def f(cache, idx, src, x, w, hidden, proj, proxy_cache, branch, branch_src, stream, branch2):
        ops.scatter_rows_(cache, idx, src, backend=backend)
        y = ops.scatter_residual(x, branch, idx, branch_src, backend=backend)
        ops.rms_norm(x, w, out=x, backend=backend)
        sel, _ = ops.proxy_select(hidden, proj, proxy_cache, 2, backend=backend)
        ops.scatter_residual(stream, branch2, idx, src, out=stream, backend=backend)
        return y, sel

    y, sel = torch.compile(f, backend="aot_eager", fullgraph=True)(
        cache, idx, src, x, w, hidden, proj, proxy_cache, branch, branch_src, stream, branch2
    )
    torch.testing.assert_close(cache, want_cache)
    torch.testing.assert_close(branch, want_branch)
    torch.testing.assert_close(x, want_x)
    torch.testing.assert_close(proxy_cache, want_proxy)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(branch2, want_branch2)
    torch.testing.assert_close(stream, want_stream)
    assert sel.shape == (2, 2)


def test_value_checks_still_run_in_eager_and_are_skipped_while_compiling():
    """An out-of-range index is an error in eager; under compile the check is skipped, not a break."""
    cache, src = torch.randn(1, 4, 3), torch.randn(1, 2, 3)
    bad = torch.tensor([[1, 1]])  # a repeat
    with pytest.raises(ValueError, match="idx: expected distinct"):
        ops.scatter_rows_(cache, bad, src, backend="torch")

    def f(cache, idx, src):
        return ops.scatter_rows_(cache, idx, src, backend="torch") * 1

    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(f, backend=counter, fullgraph=True)(cache, torch.tensor([[3, 0]]), src)
    assert counter.frame_count == 1
    torch.testing.assert_close(cache[0, [3, 0]], src[0])


def test_changing_budget_and_seed_do_not_recompile_every_call():
    """k (an output size) and the seed are SymInt in the schemas: after the first change dynamo makes
    them dynamic instead of specializing the graph on each value."""

    def f(h, head, proj, cache, k, seed):
        sel, _ = ops.proxy_select(h, proj, cache, k, backend="torch")
        return ops.token_confidence(h, head, sel, temperature=0.5, seed=seed, backend="torch")

    g = _gen(21)
    h, head, proj = _randn(g, 2, 9, 12), _randn(g, 13, 12), _randn(g, 12, 4)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for k, seed in [(3, 1), (4, 2), (5, 3), (2, 2**32 + 9)]:
        cache = _randn(g, 2, 9, 4)
        want_cache = cache.clone()
        got = compiled(h, head, proj, cache, k, seed)
        want = f(h, head, proj, want_cache, k, seed)
        assert got[0].shape == (2, k) and torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        torch.testing.assert_close(cache, want_cache)
    assert counter.frame_count == 2


@pytest.mark.slow  # about 50 s on the 2-core CPU machine (C++ codegen and compile)
def test_compiled_with_inductor_small_case():
    """One small case through Inductor (C++ codegen on the CPU): the operators run as fallbacks."""
    pytest.importorskip("torch._inductor")

    def f(x, w, cache, idx, src):
        h = ops.rms_norm(x, w, backend="torch")
        ops.scatter_rows_(cache, idx, h[:, :2] * 2, backend="torch")
        return ops.scatter_residual(x, cache, idx, src, backend="torch") + 1

    g = _gen(3)
    x, w, src = _randn(g, 2, 5, 4), _randn(g, 4), _randn(g, 2, 2, 4)
    idx = _rand_idx(g, 2, 2, 5, distinct=True)
    c_eager, c_comp = _randn(_gen(4), 2, 5, 4), _randn(_gen(4), 2, 5, 4)
    want = f(x, w, c_eager, idx, src)
    got = torch.compile(f, backend="inductor", fullgraph=True)(x, w, c_comp, idx, src)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(c_comp, c_eager)


@pytest.mark.gpu
def test_public_ops_capture_in_a_cuda_graph():
    """With the default index checks on, capture skips the host reads; the replay recomputes."""
    dev = torch.device("cuda")
    g = _gen(11)
    x, w = _randn(g, 2, 9, 64, device=dev), _randn(g, 64, device=dev)
    cache, src = _randn(g, 2, 9, 64, device=dev), _randn(g, 2, 3, 64, device=dev)
    idx = _rand_idx(g, 2, 3, 9, distinct=True, device=dev)
    ops.rms_norm(x, w)  # warm-up: compile the kernels outside the capture
    ops.scatter_residual(x, cache.clone(), idx, src)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.scatter_residual(ops.rms_norm(x, w), cache, idx, src)
    x.copy_(_randn(g, 2, 9, 64, device=dev))
    cache_before = cache.clone()
    graph.replay()
    torch.cuda.synchronize()
    want_cache = reference.scatter_rows_(cache_before, idx, src)
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-5) + want_cache, rtol=1e-4, atol=1e-4)
