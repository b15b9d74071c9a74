"""No host in the loop: zero host syncs per fixed-count step, a compile-clean step, CUDA-graph replay.

* the sync guard (``spacache_kernels.sync_guard``) counts what it claims to;
* every registered policy: zero syncs per fixed-count step of ``generate()``, or, for the policies
  whose published rule is data-dependent control flow (``step_syncs``), exactly their known count;
* ``compile_step`` (``torch.compile(fullgraph=True)`` of the device part of each step, dynamo only:
  ``backend="eager"``) gives the eager tokens, FLOPs and per-layer counts: a graph break or a host
  sync would raise;
* the CUDA-graph bookkeeping (keys, warm-up, capture on second sight, static buffers, counters) on the
  CPU through a stand-in capture backend; the real capture in the ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch

from spacache_kernels import graphs
from spacache_kernels.generation import generate
from spacache_kernels.policies import (
    POLICIES,
    D2Cache,
    DKVCacheDecode,
    DLLMCache,
    ElasticCache,
    FastDLLMDual,
    FastDLLMPrefix,
    SpaCache,
    StepPlan,
    Vanilla,
)
from spacache_kernels.sync_guard import SyncCounter

N_LAYERS = 4  # the shared fixtures' depth (tests/conftest.py)

# Settings that reach every plan kind of each policy within a few steps of gen 16 / block 8.
SETTINGS = {
    "vanilla": Vanilla,
    "spa": lambda: SpaCache(proxy_rank=16, max_update_ratio=0.5, refresh_steps=5, refresh_gen_steps=3),
    "dllm_cache": lambda: DLLMCache(prompt_interval=5, gen_interval=3, ratio=0.5),
    "fast_dllm_prefix": FastDLLMPrefix,
    "fast_dllm_dual": FastDLLMDual,
    "dkv_decode": lambda: DKVCacheDecode(refresh_interval=3),
    "elastic": lambda: ElasticCache(window=4, gamma=0.0),  # gamma 0: the drift test never triggers
    "d2cache": lambda: D2Cache(k=2, rollout_p=0.2),
}
SYNC_FREE = sorted(name for name, cls in POLICIES.items() if cls.step_syncs is None)


def prompts(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, name, gen=16, steps=16, block=8, **kw):
    args = dict(gen_length=gen, steps=steps, block_length=block, backend="torch")
    return generate(model, prompts(), policy=SETTINGS[name](), **{**args, **kw})


def test_every_registered_policy_has_settings_here():
    assert sorted(SETTINGS) == sorted(POLICIES)


# -- the guard ---------------------------------------------------------------------------------------
def test_sync_counter_counts_every_kind_of_host_read():
    t = torch.arange(4.0)
    with SyncCounter() as syncs:
        (t + 1).mul_(2).sum(0, keepdim=True)  # device-only work: no sync
        assert syncs.count == 0
        t[0].item()
        bool(t[1] > 0)
        int(t[2])
        float(t[3])
        t.tolist()
        t.numpy()
        t.nonzero()
        t[t > 1]  # boolean-mask indexing: the result's shape is a count
        torch.masked_select(t, t > 1)
        torch.unique(t)
        t.repeat_interleave(torch.tensor([1, 2, 1, 0]))
    kinds = [e.what for e in syncs.events]
    assert kinds.count("aten::_local_scalar_dense") == 4
    assert "Tensor.tolist" in kinds and "Tensor.numpy" in kinds
    assert "aten::nonzero" in kinds and "aten::masked_select" in kinds
    assert any("boolean mask" in k for k in kinds)
    assert any("unique" in k for k in kinds) and "aten::repeat_interleave" in kinds
    assert syncs.count == 11
    # Outside the context nothing is counted and tolist is the original again.
    t.tolist()
    assert syncs.count == 11 and torch.Tensor.tolist.__name__ == "tolist"


def test_sync_counter_names_the_line():
    with SyncCounter() as syncs:
        from spacache_kernels.policies._rows import rows_from_mask

        rows_from_mask(torch.tensor([[True, False, True]]))  # count=None: reads the largest count
    assert syncs.count == 1
    assert "_rows.py" in syncs.report() and "rows_from_mask" in syncs.report()


# -- zero syncs per step -----------------------------------------------------------------------------
def per_step_syncs(model, name, **kw) -> list[int]:
    """Syncs between consecutive on_step calls: step k's runtime step, decide, commit and end_step plus
    step k + 1's begin_step and plan (setup and the after-loop reads fall outside)."""
    marks = []
    with SyncCounter() as syncs:
        run(model, name, on_step=lambda step, plan: marks.append(syncs.count), **kw)
    return [b - a for a, b in zip(marks, marks[1:])]


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_fixed_count_steps_do_not_sync(request, name, arch):
    model = request.getfixturevalue(arch)
    counts = per_step_syncs(model, name)
    assert len(counts) == 15
    if name == "elastic":
        # plan(): the live set's size; observe_attention(): one drift read per layer of a reuse step.
        assert counts == [1] + [N_LAYERS + 1] * 14
    elif name == "d2cache":
        assert counts == [1] * 15  # end_step(): the next token set's size
    else:
        assert counts == [0] * 15, f"{name}: {counts}"
    assert (POLICIES[name].step_syncs is None) == (name not in ("elastic", "d2cache"))


def test_temperature_and_certainty_prior_steps_do_not_sync(llada):
    assert per_step_syncs(llada, "spa", temperature=0.7, seed=[3, 4], certainty_prior=10.0) == [0] * 15


def test_dream_schedule_reads_its_count_on_the_host(dream):
    # Dream's schedule commits int(mean masked * ...) per step: one read, so it stays out of graphs.
    assert per_step_syncs(dream, "vanilla", schedule="dream") == [1] * 15


# -- a compile-clean step ----------------------------------------------------------------------------
def same_run(got, want):
    assert torch.equal(got.sequences, want.sequences)
    assert got.stats.flops == want.stats.flops
    assert got.stats.plan_kinds == want.stats.plan_kinds
    assert got.stats.layer_recomputed_tokens == want.stats.layer_recomputed_tokens
    assert got.stats.steps == want.stats.steps


# Dynamo's graph capture is what fullgraph checks (a break or a host sync raises); "eager" runs the
# captured graph without code generation, which on 2 shared cores would take minutes per graph.
@pytest.mark.parametrize("name", SYNC_FREE)
def test_compiled_step_is_one_graph_and_gives_the_eager_tokens(llada, name):
    kw = dict(gen=8, steps=8, block=8)
    same_run(run(llada, name, compile_step="eager", **kw), run(llada, name, **kw))


@pytest.mark.parametrize("name", ["spa", "dllm_cache", "fast_dllm_dual"])
def test_compiled_step_on_shifted_logits(dream, name):
    # Dream: SPA's own-position logit, dLLM-Cache's carried P - 1 state, Fast-dLLM's forced commit.
    kw = dict(gen=8, steps=8, block=4, temperature=0.5, seed=[1, 2])
    same_run(run(dream, name, compile_step="eager", **kw), run(dream, name, **kw))


# -- arguments ---------------------------------------------------------------------------------------
def test_graph_arguments_are_checked(llada):
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need a CUDA device"):
        run(llada, "vanilla", cuda_graph=True)
    with pytest.raises(ValueError, match="compile_step: needs the fixed-count rule"):
        run(llada, "vanilla", compile_step="eager", threshold=0.9)
    with pytest.raises(ValueError, match="compile_step: needs the fixed-count rule"):
        run(llada, "vanilla", compile_step="eager", factor=1.0)
    with pytest.raises(ValueError, match="compile_step: early termination"):
        run(llada, "vanilla", compile_step="eager", early_stop_steps=4)
    with pytest.raises(ValueError, match="compile_step: schedule 'dream'"):
        run(llada, "vanilla", compile_step="eager", schedule="dream")
    for name in ("elastic", "d2cache"):
        with pytest.raises(ValueError, match="compile_step: policy .* reads device values on the host"):
            run(llada, name, compile_step="eager")
    with pytest.raises(TypeError, match="cuda_graph: expected a bool"):
        run(llada, "vanilla", cuda_graph="yes")
    with pytest.raises(ValueError, match="compile_step: expected True or one of"):
        run(llada, "vanilla", compile_step="tensorrt")
    with pytest.raises(ValueError, match="cuda_graph / compile_step: choose one"):
        graphs.check_graph_args(cuda_graph=True, compile_step=True, device=torch.device("cuda"),
                                policy=Vanilla(), threshold=None, factor=None, early_stop=None,
                                schedule="llada")  # fmt: skip


def test_debug_checks_are_rejected(llada, monkeypatch):
    monkeypatch.setenv("SPACACHE_DEBUG", "1")
    with pytest.raises(ValueError, match="SPACACHE_DEBUG"):
        run(llada, "vanilla", compile_step="eager")


# -- CUDA-graph bookkeeping, on the CPU ----------------------------------------------------------------
def test_plan_key_covers_what_shapes_a_step():
    rows = torch.zeros(2, 5, dtype=torch.int64)
    base = graphs.plan_key(StepPlan(region="all", kind="cached", rows=rows), 1, None)
    assert base == graphs.plan_key(StepPlan(region="all", kind="cached", rows=rows + 3), 1, None)
    different = [
        graphs.plan_key(StepPlan(region="all", kind="cached", rows=rows[:, :4]), 1, None),  # row count
        graphs.plan_key(StepPlan(region="all", kind="cached", rows=rows), 2, None),  # commit count
        graphs.plan_key(StepPlan(region="all", kind="cached", rows=rows), 1, torch.ones(2, 8)),  # forced
        graphs.plan_key(StepPlan(region="all", kind="full"), 1, None),
        graphs.plan_key(StepPlan(region=(6, 14), kind="dual"), 1, None),
        graphs.plan_key(StepPlan(region=(14, 22), kind="dual"), 1, None),  # region
        graphs.plan_key(StepPlan(region="gen", kind="partial", sparse_kv=True), 1, None),
        graphs.plan_key(StepPlan(region="gen", kind="partial"), 1, None),
        graphs.plan_key(StepPlan(region="gen", kind="partial", first_gen_own_logit=True), 1, None),
    ]
    assert len({base, *different}) == len(different) + 1


class ReplayByRerun:
    """A stand-in for CUDA graphs on the CPU: capture records the closure and runs nothing, replay
    reruns it with the host counters restored afterwards (a real replay runs no Python), so the
    runner's static buffers, keys and counter bookkeeping decide the result as on a GPU."""

    instances: list = []

    def __init__(self):
        self.warmed, self.captured, self.replayed = 0, 0, 0
        ReplayByRerun.instances.append(self)

    def warmup(self, fn):
        self.warmed += 1
        fn()

    def capture(self, fn):
        self.captured += 1
        return fn

    def replay(self, fn):
        self.replayed += 1
        runner = self.runner
        saved = graphs._Counters.read(runner.runtime, runner.policy)
        fn()
        saved.write(runner.runtime, runner.policy)


@pytest.fixture
def cpu_graphs(monkeypatch):
    """generate(cuda_graph=True) on the CPU with :class:`ReplayByRerun` as the capture backend."""
    ReplayByRerun.instances.clear()
    original_init = graphs.GraphRunner.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.backend = ReplayByRerun()
        self.backend.runner = self

    monkeypatch.setattr(graphs.GraphRunner, "__init__", init)
    real_check = graphs.check_graph_args

    def check(**kw):
        return real_check(**{**kw, "device": torch.device("cuda")})

    monkeypatch.setattr("spacache_kernels.generation.check_graph_args", check)
    return ReplayByRerun.instances


@pytest.mark.parametrize("name", SYNC_FREE)
def test_graph_replay_bookkeeping_matches_eager(llada, cpu_graphs, name):
    got, want = run(llada, name, cuda_graph=True), run(llada, name)
    same_run(got, want)
    (backend,) = cpu_graphs
    kinds = want.stats.plan_kinds
    # One warm-up per distinct key, one capture per key seen twice, every later step a replay.
    assert backend.warmed + backend.replayed == want.stats.steps == got.stats.steps
    assert got.stats.graph_replays == backend.replayed
    assert backend.captured <= backend.warmed <= want.stats.steps
    if name == "vanilla":
        assert (backend.warmed, backend.captured, backend.replayed) == (1, 1, 15)
    if name == "dkv_decode":
        # Its cached steps' row count shrinks every step: those keys never repeat, never captured.
        assert backend.replayed == kinds["full"] - 1
    if name == "fast_dllm_dual":
        # full (x2 blocks) + one region per block: 3 keys.
        assert (backend.warmed, backend.captured) == (3, 3)


def test_graph_replay_on_shifted_logits_with_sampling(dream, cpu_graphs):
    kw = dict(gen=8, steps=8, block=4, temperature=0.5, seed=[1, 2])
    for name in ("dllm_cache", "fast_dllm_dual", "spa"):
        same_run(run(dream, name, cuda_graph=True, **kw), run(dream, name, **kw))
    assert all(b.replayed > 0 for b in cpu_graphs)


def test_graph_runner_copies_each_plans_rows_and_forced_mask_into_its_static_buffers(monkeypatch):
    # The captured work reads the static copies; each later step with the key must refill them.
    seen = []

    def fake_step(runtime, policy, plan, bufs, settings, count, forced, end_state):
        seen.append((plan.rows.clone(), forced.clone()))
        runtime.flops += 10

    monkeypatch.setattr(graphs, "device_step", fake_step)
    runtime = type("Runtime", (), {"flops": 0, "layer_rows": [0, 0], "last_plan": None})()
    policy = type("Policy", (), {"flops": 0})()
    runner = graphs.GraphRunner(runtime, policy, None, None, backend=ReplayByRerun())
    runner.backend.runner = runner
    plans = [StepPlan(region="all", kind="cached", rows=torch.tensor([[i, i + 1]])) for i in range(4)]
    forced = [torch.tensor([[i % 2 == 0, True]]) for i in range(4)]
    for plan, mask in zip(plans, forced):
        runner(plan, 1, mask, None)
    # warm-up (plan 0), capture + replay (plan 1), replays (plans 2, 3): the stand-in capture runs
    # nothing, so the step ran once per plan, each time on that plan's rows and mask.
    assert (runner.warmups, runner.captures, runner.replays) == (1, 1, 3)
    assert len(seen) == 4
    for (rows, mask), plan, want in zip(seen, plans, forced, strict=True):
        assert torch.equal(rows, plan.rows) and torch.equal(mask, want)
    assert runtime.flops == 40  # the warm-up's 10 once per step (a replay runs no Python)
    assert runtime.last_plan.rows is runner.entries[graphs.plan_key(plans[0], 1, forced[0])].rows


# -- the real thing ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", SYNC_FREE)
@pytest.mark.parametrize("shape", ["llada-tiny", "dream-tiny"])
def test_cuda_graph_replay_gives_the_eager_tokens(name, shape):
    from spacache_kernels.models.synthetic import random_model

    model = random_model(shape, device="cuda", dtype=torch.bfloat16)
    ids = prompts(2, 16).cuda()
    kw = dict(gen_length=32, steps=32, block_length=16, backend="auto", temperature=0.5, seed=[5, 6])
    settings = {**SETTINGS, "spa": lambda: SpaCache(proxy_rank=16, refresh_steps=9, refresh_gen_steps=4)}
    want = generate(model, ids, policy=settings[name](), **kw)
    got = generate(model, ids, policy=settings[name](), cuda_graph=True, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert got.stats.flops == want.stats.flops
    assert got.stats.layer_recomputed_tokens == want.stats.layer_recomputed_tokens
    if name != "dkv_decode":
        assert got.stats.graph_replays > 0
