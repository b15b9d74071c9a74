"""SPA-Cache (arXiv 2602.02544): singular-proxy drift selection with per-layer budgets.

Per layer, the generated tokens whose low-rank value proxy (``h @ U[:, :r] S[:r]`` from the SVD of
``Wv``) drifted most since their last visit are recomputed, within a per-layer budget shaped like a
two-sided Gaussian over depth; full and generated-region refreshes run on fixed periods. The exact
rules, the reference defaults (rank 128, max ratio 0.25, min ratio 2^-4, refresh 50 / 7), the
published runs (entries ``spa:*`` of :data:`spacache_kernels.decoding.PUBLISHED`) and every
deliberate deviation are written out in ``docs/policies.md`` ("Rules of each policy", ``spa``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spacache_kernels.decoding import settings_of
from spacache_kernels.ops.proxy import _resolve_rank, proxy_select, svd_proxy
from spacache_kernels.policies.base import (
    CachePolicy,
    GenerationShape,
    LayerContext,
    StepPlan,
    check_early_stop_steps,
    check_positive_int,
)
from spacache_kernels.policies.budget import ARCH_PRESET, PRESETS, update_ratios

FIRST_GEN_LOGIT = ("own", "prompt_end")


# model -> {key: proxies}: weak, so the proxies live exactly as long as the model they belong to.
_PROXY_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _read_proxies(path: pathlib.Path, model, rank: int) -> list[torch.Tensor] | None:
    """The stored proxies, or None when absent; a corrupt or mismatched file is warned about and
    rebuilt (never trusted, never fatal)."""
    if not path.exists():
        return None
    want = (model.config.d_model, rank)
    try:
        stored = torch.load(path, map_location=model.device, weights_only=True)
        ok = isinstance(stored, list) and len(stored) == len(model.layers) - 1
        ok = ok and all(isinstance(p, torch.Tensor) and tuple(p.shape) == want for p in stored)
    except Exception as err:  # any unreadable file: rebuild
        ok, stored = False, err
    if not ok:
        warnings.warn(f"SpaCache: proxy cache file {path} is corrupt or does not match the model; rebuilding",
                      stacklevel=3)  # fmt: skip
        return None
    return [p.to(model.dtype) for p in stored]


def _write_atomically(path: pathlib.Path, value) -> None:
    """torch.save to a temporary file in the same directory, then rename: readers (another process
    sharing the cache) never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(value, fh)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(repr=False)
class SpaCache(CachePolicy):
    """SPA-Cache policy (rules and defaults: docs/policies.md, ``spa``).

    Args:
        proxy_rank: rank r of the singular proxy (int; clamped to the rank of Wv, where the proxy is
            already exact), or a fraction in (0, 1] of the KV width.
        max_update_ratio / avg_update_ratio: scale of the per-layer budget curve.
        budget: "gaussian" | "uniform" | a sequence of per-layer ratios.
        refresh_steps / refresh_gen_steps: full and generated-region refresh periods (steps).
        sparse_kv: recompute K/V only for the selected tokens (not in the reference).
        preset: budget-curve preset name (``"auto"``: from the model's architecture).
        min_update_ratio: floor of the curve's shallow side (2^-4, the published runs' value).
        cache_warmup_steps: steps ``0 .. cache_warmup_steps`` are all full refreshes.
        early_stop_steps: early termination period for ``generate()`` (an int, ``"block"`` for the
            block length, or None: off); see docs/policies.md.
        first_gen_logit: shifted-logit models only, steps without a full refresh: ``"own"`` (the
            reference) predicts generated token 0 from its own position, ``"prompt_end"`` recomputes
            position P - 1 and predicts it from there (more exact).
        cache_dir: directory where the SVD proxies are stored and reused across runs (optional; ``~``
            is expanded; files are keyed by a digest of every value projection, written atomically,
            and a corrupt one is rebuilt). In memory the proxies are computed once per model and
            weights whatever ``cache_dir`` is.
        backend: backend of the proxy-selection op ("auto" | "triton" | "torch" | None).
    """

    name = "spa"
    row_state = {"proxy_cache": 1}
    presets = settings_of("spa")
    needs_branch_cache = True

    proxy_rank: int | float = 128
    max_update_ratio: float | None = 0.25
    avg_update_ratio: float | None = None
    budget: str | Sequence[float] = "gaussian"
    refresh_steps: int = 50
    refresh_gen_steps: int = 7
    sparse_kv: bool = False
    preset: str = "auto"
    min_update_ratio: float = 2**-4
    cache_warmup_steps: int = 0
    early_stop_steps: int | str | None = None
    first_gen_logit: str = "own"
    cache_dir: str | os.PathLike | None = None
    backend: str | None = None

    def __post_init__(self):
        proxy_rank, preset, min_update_ratio = self.proxy_rank, self.preset, self.min_update_ratio
        if isinstance(proxy_rank, bool) or not isinstance(proxy_rank, (int, float)):
            raise TypeError(
                f"proxy_rank: expected an int or a float fraction, got {type(proxy_rank).__name__}"
            )
        if isinstance(proxy_rank, float) and not 0 < proxy_rank <= 1:
            raise ValueError(f"proxy_rank: a float rank must be a fraction in (0, 1], got {proxy_rank}")
        if isinstance(proxy_rank, int) and proxy_rank < 1:
            raise ValueError(f"proxy_rank: expected a positive int, got {proxy_rank}")
        if preset != "auto" and preset not in PRESETS:
            raise ValueError(f"preset: expected 'auto' or one of {sorted(PRESETS)}, got {preset!r}")
        if not 0 <= min_update_ratio <= 1:
            raise ValueError(f"min_update_ratio: expected a value in [0, 1], got {min_update_ratio}")
        warmup = self.cache_warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"cache_warmup_steps: expected an int >= 0, got {warmup!r}")
        if self.first_gen_logit not in FIRST_GEN_LOGIT:
            raise ValueError(
                f"first_gen_logit: expected one of {FIRST_GEN_LOGIT}, got {self.first_gen_logit!r}"
            )
        check_early_stop_steps(self.early_stop_steps)
        check_positive_int("refresh_steps", self.refresh_steps)
        check_positive_int("refresh_gen_steps", self.refresh_gen_steps)
        self.sparse_kv = bool(self.sparse_kv)
        # expanduser: "~/x" is the home directory, not a folder named "~" in the working directory.
        if self.cache_dir is not None:
            self.cache_dir = pathlib.Path(self.cache_dir).expanduser()
        budget = self.budget
        # Validates the budget arguments now rather than at the first generate().
        update_ratios(
            4 if isinstance(budget, str) else len(budget), budget,
            max_update_ratio=self.max_update_ratio, avg_update_ratio=self.avg_update_ratio,
            min_update_ratio=min_update_ratio, preset="llada-8b" if preset == "auto" else preset,
        )  # fmt: skip
        if not isinstance(budget, str):
            # Per-layer ratios as a tuple of floats: comparable (==) and not aliased to the caller's list.
            self.budget = tuple(float(r) for r in budget)

    # -- setup ---------------------------------------------------------------------------------
    def layer_ratios(self, model) -> list[float]:
        preset = ARCH_PRESET.get(model.config.arch, "llada-8b") if self.preset == "auto" else self.preset
        ratios = update_ratios(
            model.config.n_layers, self.budget, max_update_ratio=self.max_update_ratio,
            avg_update_ratio=self.avg_update_ratio, min_update_ratio=self.min_update_ratio, preset=preset,
        )  # fmt: skip
        return [float(r) for r in ratios]

    def proxies(self, model) -> list[torch.Tensor | None]:
        """Per-layer proxy projections (d, r) in the model's dtype (layer 0: None, never used).

        Computed once per model and weights (31 SVDs of 4096 x 4096 at LLaDA-8B): memoized on the
        model object (weakly: they go with the model) under the rank, the device, the dtype and each
        value projection's identity and in-place version counter, so any policy instance, any
        generate() call and any lm-eval batch reuses them until the weights change.
        """
        rank = self._rank(model)
        key = (rank, str(model.device), model.dtype,
               tuple((layer.w_kv.data_ptr(), layer.w_kv._version) for layer in model.layers))  # fmt: skip
        memo = _PROXY_MEMO.setdefault(model, {})
        if key not in memo:
            memo.clear()  # only the current weights' proxies are kept
            memo[key] = self._load_or_build(model, rank)
        return memo[key]

    def _rank(self, model) -> int:
        rank, (out_features, in_features) = self.proxy_rank, model.layers[0].w_v.shape
        if isinstance(rank, float):
            return _resolve_rank(rank, out_features, in_features)
        # A rank at or above Wv's own rank gives an exact proxy (an isometry of the value vector), so
        # clamping there changes nothing; it lets the reference default (128) run on small models.
        return min(rank, out_features, in_features)

    def _fingerprint(self, model, rank: int) -> str:
        """A digest of everything the stored proxies depend on: the format, the rank, the dtype, the
        config, and every byte of every value projection they are computed from."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"spa-proxy-v2|{rank}|{model.dtype}|{model.config!r}".encode())
        for layer in model.layers[1:]:
            w_v = layer.w_v.detach().contiguous().cpu()
            h.update(w_v.view(torch.uint8).numpy().tobytes() if w_v.numel() else b"")
        return h.hexdigest()

    def _load_or_build(self, model, rank: int) -> list[torch.Tensor | None]:
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"spa_proxy_{self._fingerprint(model, rank)}.pt"
            stored = _read_proxies(path, model, rank)
            if stored is not None:
                return [None] + stored
        built = [svd_proxy(layer.w_v, rank, dtype=model.dtype) for layer in model.layers[1:]]
        if path is not None:
            _write_atomically(path, [p.cpu() for p in built])
        return [None] + built

    def reset(self, model, shape: GenerationShape) -> None:
        super().reset(model, shape)
        self.ratios = self.layer_ratios(model)
        # int(ratio * G) as the reference; a ratio of 1 means "all rows" (None).
        self.budgets = [None if r >= 1.0 else int(r * shape.gen_len) for r in self.ratios]
        self.proj = self.proxies(model)
        rank = self.proj[1].shape[1] if len(self.proj) > 1 else 1
        self.proxy_cache = torch.zeros(
            model.config.n_layers, shape.batch, shape.gen_len, rank, dtype=torch.float32, device=shape.device
        )

    # -- per step --------------------------------------------------------------------------------
    def plan(self, step: int) -> StepPlan:
        if step % self.refresh_steps == 0 or step <= self.cache_warmup_steps:
            return StepPlan(region="all", kind="full")
        # Shifted logits: the reference's logits cover the generated region only (token 0 from its own
        # position), or ("prompt_end") position P - 1 runs too and predicts token 0 as the model intends.
        shifted = bool(self.model.config.shift_logits)
        own = shifted and self.first_gen_logit == "own"
        region = (self.shape.prompt_len - 1, self.shape.prompt_len + self.shape.gen_len)
        region = region if shifted and not own else "gen"
        if step % self.refresh_gen_steps == 0:
            return StepPlan(region=region, kind="gen", first_gen_own_logit=own)
        return StepPlan(region=region, kind="partial", sparse_kv=self.sparse_kv, first_gen_own_logit=own)

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        layer, normed, plan = ctx.layer, ctx.normed, ctx.plan
        if layer == 0:
            return None
        # The live rows end with the generated region; anything before it is prompt (recomputed).
        gen_rows = normed[:, normed.shape[1] - self.shape.gen_len :]
        budget = self.budgets[layer] if plan.kind == "partial" else None
        # Refreshes and full-budget layers still write this step's proxy (k = 0: no selection).
        idx, _ = proxy_select(
            gen_rows.contiguous(), self.proj[layer], self.proxy_cache[layer], budget or 0,
            backend=self.op_backend(),
        )  # fmt: skip
        batch, rows, width = gen_rows.shape
        self.flops += 2 * batch * rows * width * self.proj[layer].shape[1]
        return idx if budget is not None else None
