"""End-to-end policy throughput: every caching policy x model shape x decoding setting.

Each run is one ``spacache_kernels.generate.generate`` call on a model with random weights
(:func:`spacache_kernels.models.synthetic.random_model`, drawn on the device: no download), a prompt of
random tokens and the whole answer masked. Per run it reports

* step latency: the median over the steps (each step timed from one ``policy.plan`` call to the next,
  with CUDA events on a GPU, ``time.perf_counter`` on the CPU) and the mean (``seconds / steps``);
* tokens/s: generated tokens only (no EOS with random weights, so every generated token counts);
* FLOPs per step (``out.stats.flops_per_step``: the rows each op really processed) and the ratio to
  vanilla on the same shape / setting / batch; the recomputed-rows ratio (token-layer rows, per step);
* working memory: GPU ``max_memory_allocated`` during the run minus what was allocated before it
  (the weights); CPU: growth of the peak resident set (``VmHWM``) during the run;
* speedup: tokens/s over vanilla's;
* triton vs torch: the fraction of generated tokens on which the two backends agree (GPU; on the
  CPU the Triton backend is the interpreter, so this runs only with ``--compare-backends``);
* cuda_graph: on a GPU, the fixed-count settings run once more with ``generate(..., cuda_graph=True)``
  for every policy without ``step_syncs``: tokens/s (each call captures its own graphs, so the capture
  is inside the timing) and the token agreement with the eager run; "eager only" where the setting
  or the policy keeps the eager loop (threshold rule, Elastic-Cache, d2Cache), "n/a" on the CPU;
* physical floor per step: ``max(weight bytes / copy bandwidth, FLOPs per step / GEMM peak)`` with
  both peaks measured in the same run (``bench.harness.measured_peaks``), and the floor as % of the
  measured mean step.

Random weights make every token nearly equally likely, so the threshold rule (Fast-dLLM setting)
commits about one token per step, and bf16 ties can make the two backends' tokens differ without
either being wrong; the FLOPs ratios are exact on every device.
An update-ratio sweep of ``spa`` (``max_update_ratio``) feeds the speed-vs-update-ratio plot.
``python -m bench`` runs this after the kernel microbenchmarks; see ``add_arguments`` for options.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import inspect
import json
import math
import os
import pathlib
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bench.harness import git_commit
from spacache_kernels.decoding import decode_config
from spacache_kernels.generation import generate
from spacache_kernels.models.synthetic import SHAPES, random_model
from spacache_kernels.policies import POLICIES, make_policy, policy_class

ON_GPU = torch.cuda.is_available()

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DOCS = REPO / "docs" / "benchmarks.md"
IMG_DIR = REPO / "docs" / "img"


@dataclass(frozen=True)
class Setting:
    """A decoding setting: lengths, block size and unmasking rule."""

    name: str
    gen_length: int
    steps: int
    block_length: int
    threshold: float | None
    description: str


def _setting(name: str, key: str) -> Setting:
    """Benchmark setting ``name``: the decoding of published setting ``key`` (the one table,
    ``spacache_kernels.decoding.PUBLISHED``)."""
    cfg = decode_config(key)
    steps = cfg.generate_kwargs()["steps"]
    return Setting(name, cfg.gen_length, steps, cfg.block_length, cfg.threshold, cfg.description)


# Benchmark label -> the published setting whose decoding it runs (every policy runs under both).
SETTING_SOURCES = {"spa-gsm8k": "spa:llada-8b-gsm8k", "fast-dllm": "fast_dllm_dual:llada-8b-gsm8k"}
SETTINGS: dict[str, Setting] = {name: _setting(name, key) for name, key in SETTING_SOURCES.items()}
SWEEP_POLICY = "spa"
SWEEP_PARAM = "max_update_ratio"
DEFAULT_RATIOS = (0.05, 0.1, 0.25, 0.5)
BASELINE = "vanilla"
DEFAULT_SHAPES = ("llada-8b", "dream-7b") if ON_GPU else ("llada-tiny",)
DEFAULT_BATCHES = (1, 16) if ON_GPU else (1,)
DEFAULT_PROMPT = 128 if ON_GPU else 32


@dataclass
class E2EConfig:
    """What one e2e run covers. ``gen_length`` / ``steps`` override every setting's (smoke tests)."""

    shapes: list[str] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    prompt_len: int = DEFAULT_PROMPT
    gen_length: int | None = None
    steps: int | None = None
    compare_backends: bool = ON_GPU
    warmup: bool = ON_GPU
    threads: int | None = None if ON_GPU else 1
    seed: int = 0
    progress: bool = True
    run_timeout: float | None = None  # seconds per generate() call; None: no limit
    repeats: int = 1  # timed runs per row; the fastest is reported (a shared machine's noise)
    cuda_graph: bool = ON_GPU  # also time generate(..., cuda_graph=True) where it applies (GPU only)

    def __post_init__(self):
        self.shapes = [_known("model shape", s.strip().lower(), SHAPES) for s in self.shapes]
        self.settings = [_known("setting", s.strip().lower(), SETTINGS) for s in self.settings]
        self.policies = [_known_policy(p) for p in self.policies]
        if BASELINE not in self.policies:  # speedups and FLOPs ratios are relative to it
            self.policies.insert(0, BASELINE)
        else:
            self.policies.remove(BASELINE)
            self.policies.insert(0, BASELINE)
        for b in self.batches:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"batch: expected positive integers, got {b!r}")
        if self.run_timeout is not None and not self.run_timeout > 0:
            raise ValueError(f"run_timeout: expected a positive number of seconds, got {self.run_timeout!r}")
        for r in self.ratios:
            if not 0 < r <= 1:
                raise ValueError(f"ratios: expected values in (0, 1], got {r!r}")
        if self.ratios and SWEEP_POLICY not in POLICIES:
            raise ValueError(f"ratios: the sweep needs the {SWEEP_POLICY!r} policy, which is not registered")
        for name in ("prompt_len", "gen_length", "steps", "threads", "repeats"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for s in self.settings:
            setting = self.setting(s)
            if setting.gen_length % setting.block_length:
                raise ValueError(
                    f"gen_length: {setting.gen_length} is not a multiple of setting {s!r}'s block length "
                    f"{setting.block_length}"
                )
            if setting.steps % (setting.gen_length // setting.block_length):
                raise ValueError(
                    f"steps: {setting.steps} is not a multiple of setting {s!r}'s block count "
                    f"{setting.gen_length // setting.block_length}"
                )

    def setting(self, name: str) -> Setting:
        base = SETTINGS[name]
        return dataclasses.replace(
            base,
            gen_length=self.gen_length or base.gen_length,
            steps=self.steps or (self.gen_length or base.steps),
        )


def _known(what: str, name: str, table) -> str:
    if name not in table:
        raise ValueError(f"{what}: unknown {name!r}; expected one of {sorted(table)}")
    return name


def _known_policy(spec: str) -> str:
    """A registered name (normalized), or ``package.module:Class`` kept as given (the one resolver,
    ``policies.policy_class``, checks that it imports)."""
    name = spec.strip().lower().replace("-", "_")
    if name in POLICIES or ":" not in spec:
        return _known("policy", name, POLICIES)
    policy_class(spec.strip())
    return spec.strip()


# ----------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------
class RunAborted(RuntimeError):
    """A run stopped by the harness: more steps than the setting allows, or past its time limit."""


class StepClock:
    """Marks the start of every step: pass it as ``generate(..., on_step=clock)``.

    Also the harness's guard: a run that starts more than ``max_steps`` steps (a decoding loop that
    commits nothing would never end) or runs past ``timeout`` seconds raises :class:`RunAborted`
    from inside generate(), and the row records it as its error.
    """

    def __init__(self, cuda: bool, *, max_steps: int | None = None, timeout: float | None = None):
        self.cuda = cuda
        self.max_steps = max_steps
        self.timeout = timeout
        self.marks: list = []
        self.started = time.perf_counter()

    def __call__(self, step: int, plan=None) -> None:
        if self.max_steps is not None and len(self.marks) >= self.max_steps:
            raise RunAborted(f"no end after {self.max_steps} steps (a step that commits no token?)")
        if self.timeout is not None and time.perf_counter() - self.started > self.timeout:
            raise RunAborted(f"stopped after {self.timeout:g} s (--run-timeout)")
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds between consecutive step starts (the last step has no successor: left out)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) * 1e-3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _peak_rss_kib() -> int | None:
    try:
        text = pathlib.Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+)", text)
    return int(match.group(1)) if match else None


def _current_rss_kib() -> int | None:
    try:
        text = pathlib.Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmRSS:\s+(\d+)", text)
    return int(match.group(1)) if match else None


class MemoryMeter:
    """Working memory of one run: GPU peak allocated minus the allocation before it; CPU peak-RSS growth."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            self.before = _current_rss_kib()
        except OSError:
            self.before = None

    def stop(self) -> tuple[float | None, float | None]:
        """(peak MB, working MB): GPU absolute peak and peak minus before; CPU (None, RSS growth)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            return peak / 2**20, (peak - self.before) / 2**20
        after = _peak_rss_kib()
        if self.before is None or after is None:
            return None, None
        return None, max(after - self.before, 0) / 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _policy_kwargs_ok(name: str, kwargs: dict) -> bool:
    params = inspect.signature(policy_class(name)[0]).parameters
    return all(k in params for k in kwargs)


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
def run_once(
    model, input_ids, setting: Setting, policy: str, backend: str, policy_kwargs=None, timeout=None,
    cuda_graph: bool = False,
) -> dict:  # fmt: skip
    """One timed generate(); returns the raw measurements (raises whatever generate raises).

    Every step commits at least one token per live row, so a run needs at most ``steps`` (fixed
    count) or ``gen_length`` (threshold) steps; one that goes beyond is stopped (:class:`StepClock`).
    """
    instance = make_policy(policy, **(policy_kwargs or {}))
    cuda = model.device.type == "cuda"
    limit = setting.steps if setting.threshold is None else setting.gen_length
    clock = StepClock(cuda, max_steps=limit, timeout=timeout)
    meter = MemoryMeter(model.device)
    meter.start()
    out = generate(
        model, input_ids, gen_length=setting.gen_length, steps=setting.steps,
        block_length=setting.block_length, policy=instance, threshold=setting.threshold, backend=backend,
        on_step=clock, cuda_graph=cuda_graph,
    )  # fmt: skip
    peak_mb, work_mb = meter.stop()
    stats = out.stats
    per_step = clock.step_seconds()
    batch = input_ids.shape[0]
    return {
        "steps": stats.steps,
        "generated_tokens": stats.generated_tokens,
        "seconds": stats.seconds,
        "step_ms_median": 1e3 * (statistics.median(per_step) if per_step else stats.seconds),
        "step_ms_mean": 1e3 * stats.seconds / max(stats.steps, 1),
        "tokens_per_s": stats.tokens_per_second,
        "flops": stats.flops,
        "gflop_per_step": stats.flops_per_step / 1e9,
        "rows_per_step": sum(stats.layer_recomputed_tokens) / max(stats.steps, 1) / batch,
        "peak_mem_mb": peak_mb,
        "work_mem_mb": work_mb,
        "plan_kinds": dict(stats.plan_kinds),
        "sequences": out.sequences[:, input_ids.shape[1] :].cpu(),
    }


def warmup(model, input_ids, setting: Setting, policy: str, backend: str, policy_kwargs=None) -> None:
    """One short generate() with the run's lengths and batch (same kernel shapes, fewest steps)."""
    blocks = setting.gen_length // setting.block_length
    generate(
        model, input_ids, gen_length=setting.gen_length, steps=blocks, block_length=setting.block_length,
        policy=make_policy(policy, **(policy_kwargs or {})), backend=backend,
    )  # fmt: skip


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# the whole matrix
# ----------------------------------------------------------------------------------------------
def plan_runs(cfg: E2EConfig) -> list[dict]:
    """Every (shape, setting, batch, policy, variant) to run, in order (vanilla first in each group)."""
    runs = []
    spa_default = None
    if SWEEP_POLICY in POLICIES:
        spa_default = getattr(make_policy(SWEEP_POLICY), SWEEP_PARAM, None)
    for shape in cfg.shapes:
        for setting in cfg.settings:
            for bi, batch in enumerate(cfg.batches):
                for policy in cfg.policies:
                    runs.append(dict(shape=shape, setting=setting, batch=batch, policy=policy, kwargs={}))
                if bi == 0:  # the sweep runs at the first batch size only
                    for ratio in cfg.ratios:
                        if SWEEP_POLICY in cfg.policies and spa_default is not None and ratio == spa_default:
                            continue  # the main spa row is this point
                        runs.append(
                            dict(shape=shape, setting=setting, batch=batch, policy=SWEEP_POLICY,
                                 kwargs={SWEEP_PARAM: ratio}, sweep=True)
                        )  # fmt: skip
    return runs


def run_matrix(cfg: E2EConfig) -> dict:
    """Run everything ``cfg`` names; returns ``{"meta": ..., "rows": [...]}`` (rows: one dict per run)."""
    threads = torch.get_num_threads()
    if cfg.threads is not None and not ON_GPU:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_matrix(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_matrix(cfg: E2EConfig) -> dict:
    from bench import harness

    if cfg.compare_backends and not ON_GPU:
        # The Triton backend on the CPU is the interpreter; the switch must precede the first kernel
        # import (kernel modules are imported lazily, on first use). Every run names its backend, so
        # the switch never changes what "auto" means here.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    backend = "triton" if ON_GPU else "torch"
    harness.measured_peaks.cache_clear()  # measure under this run's thread count, not the caller's
    peaks = harness.measured_peaks()
    runs = plan_runs(cfg)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="e2e", unit="run", leave=False)

    spa_default = getattr(make_policy(SWEEP_POLICY), SWEEP_PARAM, None) if SWEEP_POLICY in POLICIES else None
    rows: list[dict] = []
    model = None
    model_shape = None
    for run in runs:
        shape, setting_name, batch, policy = run["shape"], run["setting"], run["batch"], run["policy"]
        setting = cfg.setting(setting_name)
        if model_shape != shape:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = random_model(shape, device=device, dtype=dtype, seed=cfg.seed)
            model_shape = shape
            weight_bytes = model.num_parameters() * model.dtype.itemsize
            # First-touch warm-up (allocator, lazy imports) so the first timed run is not penalized.
            first = dataclasses.replace(setting, gen_length=setting.block_length, steps=1, threshold=None)
            try:
                warmup(model, _prompts(model, 1, cfg.prompt_len, cfg.seed, device), first, BASELINE, backend)
            except Exception:  # the timed runs report the error in their rows
                pass
        ids = _prompts(model, batch, cfg.prompt_len, cfg.seed, device)
        kwargs = run["kwargs"]
        variant = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        if not variant and policy == SWEEP_POLICY and spa_default is not None:
            variant = f"{SWEEP_PARAM}={spa_default}"
        row = dict(
            shape=shape, setting=setting_name, batch=batch, policy=policy, variant=variant,
            backend=backend, sweep=bool(run.get("sweep")), gen_length=setting.gen_length,
            block_length=setting.block_length, threshold=setting.threshold, prompt_len=cfg.prompt_len,
        )  # fmt: skip
        if bar is not None:
            bar.set_postfix_str(f"{shape} {setting_name} B={batch} {policy} {variant}".strip())
        try:
            if kwargs and not _policy_kwargs_ok(policy, kwargs):
                raise TypeError(f"{policy} takes no {sorted(kwargs)}")
            if cfg.warmup:
                warmup(model, ids, setting, policy, backend, kwargs)
            measured = [
                run_once(model, ids, setting, policy, backend, kwargs, cfg.run_timeout)
                for _ in range(cfg.repeats)
            ]
            row.update(min(measured, key=lambda m: m["seconds"]))  # the fastest: least disturbed
            row["repeats"] = cfg.repeats
            floor = max(weight_bytes / peaks["bandwidth"], row["gflop_per_step"] * 1e9 / peaks["flops"])
            row["floor_ms"] = 1e3 * floor
            row["pct_of_floor"] = 100 * row["floor_ms"] / row["step_ms_mean"]
        except Exception as exc:  # a policy that fails is a result, not a crash
            row["error"] = _error_text(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        compare = cfg.compare_backends and batch == cfg.batches[0] and not row["sweep"]
        if "error" not in row and compare:
            other_backend = "torch" if backend == "triton" else "triton"
            row["agreement_backend"] = other_backend
            try:
                other = run_once(model, ids, setting, policy, other_backend, kwargs, cfg.run_timeout)
                row[f"{other_backend}_tokens_per_s"] = other["tokens_per_s"]
                row["backend_agreement"] = float((other["sequences"] == row["sequences"]).float().mean())
            except Exception as exc:
                row["backend_agreement_error"] = _error_text(exc)
        _cuda_graph_run(cfg, row, model, ids, setting, policy, backend, kwargs)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _relative(rows)
    for row in rows:
        row.pop("sequences", None)
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "threads": torch.get_num_threads() if not ON_GPU else None,
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "peaks": {"copy_GBps": peaks["bandwidth"] / 1e9, "gemm_TFLOPs": peaks["flops"] / 1e12,
                  "gemm_dtype": peaks["gemm_dtype"]},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"},
        "settings": {name: dataclasses.asdict(cfg.setting(name)) for name in cfg.settings},
    }  # fmt: skip
    return {"meta": meta, "rows": rows}


def _cuda_graph_run(cfg: E2EConfig, row: dict, model, ids, setting: Setting, policy: str, backend: str,
                    kwargs: dict) -> None:  # fmt: skip
    """The row's ``cuda_graph`` columns: the same run with ``cuda_graph=True`` where it applies."""
    if not cfg.cuda_graph or "error" in row or row["sweep"]:
        return
    if setting.threshold is not None or policy_class(policy)[0].step_syncs is not None:
        row["cuda_graph_note"] = "eager only"
        return
    try:
        graph = run_once(model, ids, setting, policy, backend, kwargs, cfg.run_timeout, cuda_graph=True)
        row["cuda_graph_tokens_per_s"] = graph["tokens_per_s"]
        row["cuda_graph_step_ms"] = graph["step_ms_mean"]
        row["cuda_graph_agreement"] = float((graph["sequences"] == row["sequences"]).float().mean())
    except Exception as exc:
        row["cuda_graph_note"] = "error: " + _error_text(exc)


def _prompts(model, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """(B, P) random prompt ids that avoid the mask id (drawn on the CPU so every device sees the same)."""
    g = torch.Generator().manual_seed(seed + 1000 * batch + length)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab - 1, (batch, length), generator=g)
    ids = torch.where(ids >= model.mask_id, ids + 1, ids)  # skip the mask id, stay < vocab
    return ids.to(device)


def _relative(rows: list[dict]) -> None:
    """Speedup, FLOPs ratio and recomputed-rows ratio against vanilla of the same shape/setting/batch."""
    base = {
        (r["shape"], r["setting"], r["batch"]): r
        for r in rows
        if r["policy"] == BASELINE and not r["sweep"] and "error" not in r
    }
    for r in rows:
        ref = base.get((r["shape"], r["setting"], r["batch"]))
        if ref is None or "error" in r:
            continue
        r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["flops_ratio"] = r["gflop_per_step"] / ref["gflop_per_step"]
        r["rows_ratio"] = r["rows_per_step"] / ref["rows_per_step"]


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    ("shape", "shape"),
    ("setting", "setting"),
    ("batch", "B"),
    ("policy", "policy"),
    ("variant", "variant"),
    ("steps", "steps"),
    ("step_ms_median", "step ms (median)"),
    ("tokens_per_s", "tok/s"),
    ("gflop_per_step", "GFLOP/step"),
    ("work_mem_mb", "work mem MB"),
    ("speedup", "speedup"),
    ("flops_ratio", "FLOPs ratio"),
    ("backend_agreement", "triton=torch"),
    ("cuda_graph_tokens_per_s", "cuda_graph tok/s"),
    ("floor_ms", "floor ms"),
    ("pct_of_floor", "% of floor"),
    ("error", "error"),
)


def _cell(row: dict, key: str, cpu_note: bool) -> str:
    value = row.get(key)
    if key == "backend_agreement" and value is None and "error" not in row:
        if row.get("backend_agreement_error"):
            return "error"
        return "n/a (GPU only)" if cpu_note else ""
    if key == "cuda_graph_tokens_per_s" and value is None and "error" not in row:
        note = row.get("cuda_graph_note")
        return note or ("" if row.get("sweep") else "n/a (GPU only)")  # GPU rows always get one of the two
    if key == "cuda_graph_tokens_per_s" and value is not None:
        agree = row.get("cuda_graph_agreement")
        return f"{value:.1f}" + (f" ({agree:.3f} same)" if agree is not None else "")
    if key == "error" and value:
        return value if len(value) <= 70 else value[:67] + "..."
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if key in ("speedup", "flops_ratio", "backend_agreement"):
            return f"{value:.3f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    cpu_note = result["meta"]["device_type"] == "cpu" and not result["meta"]["config"]["compare_backends"]
    rows = [r for r in result["rows"]]
    keys = [k for k, _ in TABLE_COLUMNS]
    if not any(r.get("error") for r in rows):
        keys.remove("error")
    header = [dict(TABLE_COLUMNS)[k] for k in keys]
    return header, [[_cell(r, k, cpu_note) for k in keys] for r in rows]


def format_text(result: dict) -> str:
    header, cells = table_rows(result)
    everything = [header] + cells
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in everything]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    header, cells = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def header_text(result: dict) -> str:
    meta = result["meta"]
    cfg = meta["config"]
    lines = [
        f"spacache_kernels end-to-end policy throughput | device: {meta['device']} | commit {meta['commit']} "
        f"| {meta['date']}",
    ]
    if meta["device_type"] == "cpu":
        lines.append(
            f"CPU-only machine: torch backend, {meta['dtype']}, {meta['threads']} thread(s), scaled-down "
            f"shape(s) {', '.join(cfg['shapes'])} (same structure as LLaDA-8B / Dream-7B, small width and "
            "depth). Timings say the harness works; FLOPs ratios are exact. Run `make bench` on a GPU for "
            "the Triton kernels at the real shapes."
        )
    else:
        lines.append(f"GPU: Triton backend, {meta['dtype']}, random weights at the real shapes.")
    lines.append(
        f"measured peaks: copy {meta['peaks']['copy_GBps']:.1f} GB/s, {meta['peaks']['gemm_dtype']} GEMM "
        f"{meta['peaks']['gemm_TFLOPs']:.2f} TFLOP/s "
        "(floor = max(weight bytes / copy, FLOPs / GEMM) per step)"
    )
    for name, s in meta["settings"].items():
        rule = f"threshold {s['threshold']}" if s["threshold"] is not None else "fixed count"
        lines.append(
            f"setting {name}: gen {s['gen_length']}, steps {s['steps']}, block {s['block_length']}, {rule}; "
            f"prompt {cfg['prompt_len']} random tokens"
        )
    return "\n".join(lines)


def speed_plot(result: dict, path: pathlib.Path) -> pathlib.Path | None:
    """Speedup vs spa's max_update_ratio (one line per shape/setting) and speedup vs recomputed rows."""
    rows = [r for r in result["rows"] if "error" not in r and "speedup" in r]
    sweep = [r for r in rows if r["policy"] == SWEEP_POLICY]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = sorted({(r["shape"], r["setting"], r["batch"]) for r in sweep})
    for shape, setting, batch in groups:
        pts = sorted(
            (float(r["variant"].split("=")[1]), r["speedup"], r["flops_ratio"])
            for r in sweep
            if (r["shape"], r["setting"], r["batch"]) == (shape, setting, batch) and "=" in r["variant"]
        )
        if not pts:
            continue
        xs = [p[0] for p in pts]
        label = f"{shape} {setting} B={batch}: speedup"
        (line,) = left.plot(xs, [p[1] for p in pts], marker="o", label=label)
        left.plot(
            xs, [1 / p[2] for p in pts], ls="--", color=line.get_color(), label="FLOPs bound: 1 / FLOPs ratio"
        )
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xlabel(f"{SWEEP_POLICY} {SWEEP_PARAM}")
    left.set_ylabel("x vanilla")
    left.set_title(f"{SWEEP_POLICY}: speed vs update ratio")
    left.legend(fontsize=7)

    main = [r for r in rows if r["batch"] == min(x["batch"] for x in rows)]
    shapes_settings = list(dict.fromkeys((r["shape"], r["setting"]) for r in main))
    marker_of = {key: "osD^v<>p*h"[i % 10] for i, key in enumerate(shapes_settings)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, policy in enumerate(dict.fromkeys(r["policy"] for r in main)):
        color = colors[ci % len(colors)]
        for key in shapes_settings:
            pts = sorted((r["rows_ratio"], r["speedup"]) for r in main
                         if r["policy"] == policy and (r["shape"], r["setting"]) == key)  # fmt: skip
            if pts:
                right.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker_of[key], color=color,
                           ls="-" if len(pts) > 1 else "none")  # fmt: skip
        right.plot([], [], "-", color=color, lw=4, label=policy)
    for key, marker in marker_of.items():
        right.plot([], [], marker, color="black", mfc="none", label=" ".join(key))
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("recomputed token-layer rows per step / vanilla's")
    right.set_ylabel("speedup (tokens/s) vs vanilla")
    right.set_title(f"every policy, batch {main[0]['batch']}")
    right.legend(fontsize=7)
    fig.suptitle(f"{result['meta']['device']}, {result['meta']['date']}, commit {result['meta']['commit']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markers(key: str) -> tuple[str, str]:
    return f"<!-- e2e-{key}:begin -->", f"<!-- e2e-{key}:end -->"


def docs_section(result: dict, command: str, image: pathlib.Path | None, docs_path: pathlib.Path) -> str:
    meta = result["meta"]
    lines = [
        "<!-- generated by bench/e2e.py; edits between these markers are overwritten -->",
        "",
        f"Device: {meta['device']}; date {meta['date']}; commit {meta['commit']}; command `{command}`.",
        "",
        "```",
        header_text(result),
        "```",
        "",
        format_markdown(result),
    ]
    if image is not None:
        rel = os.path.relpath(image, docs_path.parent)
        lines += ["", f"![speed vs update ratio]({rel})"]
    return "\n".join(lines)


def update_docs(docs_path: pathlib.Path, section: str, key: str) -> None:
    """Replace the text between the ``key`` markers (appending a marked section when absent)."""
    begin, end = markers(key)
    text = docs_path.read_text() if docs_path.exists() else ""
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        if end not in text[text.index(begin) :]:
            raise ValueError(f"{docs_path}: found {begin} without a following {end}")
        start = text.index(begin)
        stop = text.index(end, start) + len(end)
        text = text[:start] + block + text[stop:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    docs_path.write_text(text)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _csv(kind: Callable = str):
    def parse(text: str):
        if text.strip().lower() == "none":
            return []
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}") from exc

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("end-to-end policy throughput")
    g.add_argument(
        "--model-shape",
        type=_csv(),
        default=None,
        help=f"comma list of {sorted(SHAPES)} (default {','.join(DEFAULT_SHAPES)})",
    )
    g.add_argument(
        "--policies",
        type=_csv(),
        default=None,
        help=f"comma list of {sorted(POLICIES)} (default: all; vanilla is always run)",
    )
    g.add_argument("--settings", type=_csv(), default=None, help=f"comma list of {sorted(SETTINGS)}")
    g.add_argument(
        "--batch",
        type=_csv(int),
        default=None,
        help=f"comma list of batch sizes (default {','.join(map(str, DEFAULT_BATCHES))})",
    )
    g.add_argument(
        "--ratios",
        type=_csv(float),
        default=None,
        help=f"{SWEEP_POLICY} {SWEEP_PARAM} sweep (default {','.join(map(str, DEFAULT_RATIOS))}; "
        "'none' for no sweep)",
    )
    g.add_argument("--prompt-len", type=int, default=None, help=f"prompt tokens (default {DEFAULT_PROMPT})")
    g.add_argument("--gen-length", type=int, default=None, help="override every setting's gen length")
    g.add_argument("--steps", type=int, default=None, help="override every setting's step count")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads of the e2e runs (default 1 on the CPU; docs/benchmarks.md)",
    )
    g.add_argument(
        "--compare-backends",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the torch backend and report token agreement (default: on with a GPU)",
    )
    g.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run generate(..., cuda_graph=True) where it applies (default: on with a GPU)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per row, the fastest reported (default 1; for noisy shared machines)",
    )
    g.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        help="stop a generate() call after this many seconds and record it as an error",
    )
    g.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md / docs/img")
    g.add_argument("--e2e-json", default=None, help="e2e JSON path (default bench/results/e2e-<stamp>.json)")
    g.add_argument("--docs", default=str(DOCS), help=argparse.SUPPRESS)
    g.add_argument("--img-dir", default=str(IMG_DIR), help=argparse.SUPPRESS)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> E2EConfig:
    """An :class:`E2EConfig` from parsed options (ValueError with a clear message on bad ones)."""
    kwargs = {}
    if args.model_shape is not None:
        kwargs["shapes"] = args.model_shape
    if args.policies is not None:
        kwargs["policies"] = args.policies
    if args.settings is not None:
        kwargs["settings"] = args.settings
    if args.batch is not None:
        kwargs["batches"] = args.batch
    if args.ratios is not None:
        kwargs["ratios"] = args.ratios
    for name in ("prompt_len", "gen_length", "steps", "threads", "run_timeout", "repeats"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.compare_backends is not None:
        kwargs["compare_backends"] = args.compare_backends
    if getattr(args, "cuda_graph", None) is not None:
        kwargs["cuda_graph"] = args.cuda_graph
    return E2EConfig(**kwargs)


def command_line(argv: Sequence[str]) -> str:
    argv = list(argv)
    if os.environ.get("MAKELEVEL"):
        return "make bench" + (f' ARGS="{" ".join(argv)}"' if argv else "")
    return " ".join(["python -m bench", *argv])


def run(cfg: E2EConfig, args: argparse.Namespace, command: str) -> dict:
    """Run, print the table, save the JSON and (unless ``--no-docs``) regenerate the docs section."""
    result = run_matrix(cfg)
    result["meta"]["command"] = command
    print(header_text(result))
    print()
    print(format_text(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = pathlib.Path(args.e2e_json) if args.e2e_json else RESULTS / f"e2e-{stamp}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nE2E JSON: {out_json}")
    if not args.no_docs:
        key = result["meta"]["device_type"]  # "cpu" or "cuda": each keeps its own section
        key = "gpu" if key == "cuda" else key
        docs_path = pathlib.Path(args.docs)
        image = speed_plot(result, pathlib.Path(args.img_dir) / f"e2e-speed-vs-update-ratio-{key}.png")
        update_docs(docs_path, docs_section(result, command, image, docs_path), key)
        print(f"docs: {docs_path} (section {markers(key)[0]})" + (f", plot {image}" if image else ""))
    return result
