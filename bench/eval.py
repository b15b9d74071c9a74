"""``make eval`` / ``python -m bench.eval``: generation quality of every caching policy on trained models.

For each shipped checkpoint (``checkpoints/tiny-dlm`` and the deeper ``checkpoints/tiny-dlm-deep``,
:mod:`spacache_kernels.integrations.tiny_tasks`) decode a fixed held-out set of each of its tasks with

* every policy in ``spacache_kernels.policies.POLICIES`` at its defaults, under both unmasking rules:
  fixed count (one token per step, steps = gen_length) and Fast-dLLM's confidence threshold 0.9;
* SPA-Cache at several update ratios (fixed count);

and report per task: exact-match accuracy with a 95% Wilson interval; token agreement with vanilla
fixed-count decoding; forward FLOPs relative to vanilla fixed-count decoding (``GenerationStats.flops``,
counted from the rows each op processed, so it includes the policy's own work such as the proxy
projections); forwards per problem and tokens committed per forward (TPF); CPU seconds
(``time.process_time`` of the generate calls, torch backend). Per policy and task an AUP-style score
(:func:`aup`) joins its two operating points, so threshold decoding is credited for its parallelism
only as far as it keeps accuracy.

A policy that raises for a setting is recorded with its error instead of stopping the run.
Writes ``bench/results/quality-<stamp>.json``, ``docs/quality.md`` and ``docs/img/quality_acc_vs_flops.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import pathlib
import platform
import sys
import time
import traceback

import torch

from bench.harness import git_commit

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "quality.md"
PLOT = ROOT / "docs" / "img" / "quality_acc_vs_flops.png"
CHECKPOINTS = (ROOT / "checkpoints" / "tiny-dlm", ROOT / "checkpoints" / "tiny-dlm-deep")
SPA_RATIOS = (0.1, 0.5, 1.0)  # with the default row (max_update_ratio 0.25) the sweep has four points
THRESHOLD = 0.9
# Held-out problems per task (``make eval`` defaults), sized so that the whole run takes about a quarter
# of an hour of one CPU core; docs/quality.md lists the interval half-widths they give.
COUNTS = {"add": 256, "copy": 64, "sort": 128, "count": 128, "chain": 64}
AUP_ALPHA = 3.0  # steepness of the accuracy penalty in aup()
# Documented vanilla exact match below which a checkpoint's task is not evaluated: with fewer than one
# problem in five right, exact-match differences between policies are noise at these set sizes.
SOLVED = 0.2
# Below this documented vanilla exact match a task still runs, but its accuracy column cannot rank the
# caches (a fragile model loses or gains problems by chance); the doc says so next to the task.
TRUSTED = 0.8


Setting = tuple[str, str, dict, "float | None"]  # (label, registry name, constructor kwargs, threshold)


def settings(ratios=SPA_RATIOS, threshold: float | None = THRESHOLD) -> list[Setting]:
    """``(label, registry name, constructor kwargs, threshold or None)`` for every setting.

    Every registered policy at its defaults with fixed-count unmasking (label: the name), then the same
    with threshold unmasking (label ``"<name> t=0.9"``; skipped when ``threshold`` is None), then SPA's
    ratio sweep with fixed count.
    """
    from spacache_kernels.policies import POLICIES

    out = [(name, name, {}, None) for name in POLICIES]
    if threshold is not None:
        out += [(f"{name} t={threshold:g}", name, {}, threshold) for name in POLICIES]
    if "spa" in POLICIES:
        out += [(f"spa r={r:g}", "spa", {"max_update_ratio": r}, None) for r in ratios]
        out.append(("spa r=1 uniform", "spa", {"max_update_ratio": 1.0, "budget": "uniform"}, None))
    return out


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and 1, unlike the normal one)."""
    if total <= 0:
        raise ValueError(f"total: expected a positive count, got {total}")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # the interval contains p exactly: at p = 1 the rounded centre + half can land a hair below 1
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def aup(points: list[tuple[float, float]], best: float, alpha: float = AUP_ALPHA) -> float:
    """AUP-style score of operating points ``(tokens per forward, accuracy)`` against accuracy ``best``.

    The area under the accuracy-versus-parallelism curve, each accuracy y weighted by
    ``W(y) = min(1, exp(-alpha (1 - y / best)))``: the first point (lowest TPF) contributes the rectangle
    ``TPF_1 * y_1 * W(y_1)``, each later point the trapezoid from the previous one. A setting that gains
    parallelism without losing accuracy grows the area; one that loses accuracy is discounted
    exponentially. Units: correct tokens per forward (1.0 = vanilla's one token per step at ``best``).
    """
    if not points:
        raise ValueError("points: expected at least one (tokens per forward, accuracy) pair")
    if not best > 0:
        return float("nan")

    def weighted(y: float) -> float:
        return y * min(1.0, math.exp(-alpha * (1 - y / best)))

    pts = sorted(points)
    area = pts[0][0] * weighted(pts[0][1])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        area += (x1 - x0) * (weighted(y0) + weighted(y1)) / 2
    return area


def _count_row_forwards(policy) -> list[int]:
    """Wrap ``policy.begin_step`` to count row-forwards: ``generate`` calls it once per step with the
    rows still decoding, so the count is the forwards each problem took even when threshold decoding
    lets finished rows leave the batch. Returns the one-element counter list."""
    counter = [0]
    inner = policy.begin_step

    def begin_step(state):
        counter[0] += int(state.tokens.shape[0])
        return inner(state)

    policy.begin_step = begin_step
    return counter


def run_setting(model, tok, sets: dict, name: str, kwargs: dict, batch_size: int, threshold=None) -> dict:
    """Decode every task's problems with one policy setting. Returns per-task figures and sequences."""
    from spacache_kernels.integrations.tiny_tasks import decode_problems, exact_match
    from spacache_kernels.policies import make_policy

    per_task = {}
    for task, probs in sets.items():
        correct, flops, row_forwards, cpu, wall, gens = 0, 0, 0, 0.0, 0.0, []
        for start in range(0, len(probs), batch_size):
            chunk = probs[start : start + batch_size]
            policy = make_policy(name, **kwargs)
            counter = _count_row_forwards(policy)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            gen, out = decode_problems(model, tok, chunk, policy, threshold=threshold)
            cpu += time.process_time() - cpu0
            wall += time.perf_counter() - wall0
            correct += sum(exact_match(tok, chunk, gen))
            flops += out.stats.flops
            row_forwards += counter[0]
            gens.append(gen)
        generated = torch.cat(gens)
        per_task[task] = {
            "problems": len(probs),
            "correct": correct,
            "accuracy": correct / len(probs),
            "flops": flops,
            "forwards": row_forwards / len(probs),
            "tokens_per_forward": generated.numel() / row_forwards,
            "cpu_seconds": cpu,
            "wall_seconds": wall,
            "generated": generated,
        }
    return per_task


def evaluate(checkpoint, counts: dict[str, int], batch_size: int, threads: int,
             threshold: float | None = THRESHOLD, ratios=SPA_RATIOS) -> dict:  # fmt: skip
    """Every setting of :func:`settings` on ``counts[task]`` held-out problems of each task.

    Returns ``{"rows": [...], "counts": counts, "aup": {policy: {task: score}}}``; each row has
    per-task figures under ``"tasks"`` and totals, or ``"error"`` when the setting raised.
    """
    from spacache_kernels.integrations.tiny_tasks import heldout_problems
    from spacache_kernels.models import load_model
    from spacache_kernels.models.char_tokenizer import CharTokenizer

    torch.set_num_threads(threads)
    model = load_model(checkpoint, dtype=torch.float32)
    tok = CharTokenizer.load(checkpoint)
    sets = {task: heldout_problems(task, n) for task, n in counts.items()}
    rows, vanilla = [], None
    todo = [s for s in settings(ratios, threshold) if s[0] != "vanilla"]
    for label, name, kwargs, thr in [("vanilla", "vanilla", {}, None)] + todo:
        row = {"setting": label, "policy": name, "kwargs": kwargs, "threshold": thr}
        try:
            per_task = run_setting(model, tok, sets, name, kwargs, batch_size, thr)
        except Exception as err:  # a policy that fails here is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc(limit=4)
            print(f"[eval] {label}: ERROR {row['error']}", flush=True)
            rows.append(row)
            continue
        if vanilla is None:
            vanilla = per_task
        row["tasks"] = {}
        for task, fig in per_task.items():
            ref = vanilla[task]
            row["tasks"][task] = {
                "accuracy": fig["accuracy"],
                "ci95": wilson_interval(fig["correct"], fig["problems"]),
                "correct": fig["correct"],
                "problems": fig["problems"],
                "agreement": float((fig["generated"] == ref["generated"]).float().mean()),
                "flops_ratio": fig["flops"] / ref["flops"],
                "flops": fig["flops"],
                "forwards": fig["forwards"],
                "tokens_per_forward": fig["tokens_per_forward"],
                "cpu_seconds": round(fig["cpu_seconds"], 2),
                "wall_seconds": round(fig["wall_seconds"], 2),
            }
        total_correct = sum(t["correct"] for t in row["tasks"].values())
        total = sum(t["problems"] for t in row["tasks"].values())
        row["accuracy"] = total_correct / total
        row["flops_ratio"] = sum(t["flops"] for t in row["tasks"].values()) / sum(
            v["flops"] for v in vanilla.values()
        )
        row["cpu_seconds"] = round(sum(t["cpu_seconds"] for t in row["tasks"].values()), 2)
        print(f"[eval] {label}: " + _summary(row), flush=True)
        rows.append(row)
    return {"rows": rows, "counts": counts, "aup": aup_table(rows, list(counts))}


def aup_table(rows: list[dict], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per policy at its defaults (both unmasking rules) and task: :func:`aup` of its operating points,
    against vanilla fixed-count accuracy on that task."""
    ok = [r for r in rows if "error" not in r and not r["kwargs"]]
    base = next((r for r in ok if r["setting"] == "vanilla"), None)
    if base is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for policy in dict.fromkeys(r["policy"] for r in ok):
        mine = [r for r in ok if r["policy"] == policy]
        out[policy] = {
            task: aup(
                [(r["tasks"][task]["tokens_per_forward"], r["tasks"][task]["accuracy"]) for r in mine],
                base["tasks"][task]["accuracy"],
            )
            for task in tasks
        }
    return out


def _summary(row: dict) -> str:
    parts = [
        f"{task} acc {t['accuracy']:.3f} agree {t['agreement']:.3f} flops {t['flops_ratio']:.3f} "
        f"tpf {t['tokens_per_forward']:.2f}"
        for task, t in row["tasks"].items()
    ]
    return " | ".join(parts) + f" | cpu {row['cpu_seconds']:.1f}s"


def format_table(rows: list[dict], tasks: list[str], markdown: bool = False) -> str:
    """One line per setting and task: accuracy [95% interval], agreement, FLOPs ratio, forwards per
    problem, tokens per forward, CPU seconds."""
    head = ["setting", "task", "acc [95% CI]", "agree", "FLOPs", "fwd", "TPF", "CPU s"]
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([row["setting"], "", f"error: {row['error']}"] + [""] * (len(head) - 3))
            continue
        for task in tasks:
            t = row["tasks"][task]
            lo, hi = t["ci95"]
            cells.append([
                row["setting"], task, f"{t['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]", f"{t['agreement']:.3f}",
                f"{t['flops_ratio']:.3f}", f"{t['forwards']:.1f}", f"{t['tokens_per_forward']:.2f}",
                f"{t['cpu_seconds']:.1f}",
            ])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c for c in line) + " |" for line in cells]
        return "\n".join(lines)
    table = [head] + cells
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(len(head))]
    widths = [min(w, 40) for w in widths]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_aup(reports: list[dict]) -> str:
    """Markdown: one line per policy, one AUP column per (checkpoint, task)."""
    cols = [(rep["name"], task) for rep in reports for task in rep["counts"]]
    policies = list(dict.fromkeys(p for rep in reports for p in rep["aup"]))
    lines = ["| policy | " + " | ".join(f"{c} {t}" for c, t in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for policy in policies:
        vals = []
        for rep, task in [(r, t) for r in reports for t in r["counts"]]:
            v = rep["aup"].get(policy, {}).get(task)
            vals.append("" if v is None else f"{v:.2f}")
        lines.append(f"| {policy} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def losses(report: dict, min_drop: int = 2) -> dict[str, list[tuple[str, float, float]]]:
    """Per task: ``(setting, accuracy, accuracy of vanilla under the same unmasking rule)`` for every
    setting at least ``min_drop`` problems below that vanilla, largest loss first. Comparing with the
    same rule separates what the cache costs from what parallel unmasking costs."""
    ok = [r for r in report["rows"] if "error" not in r]
    ref = {r["threshold"]: r for r in ok if r["policy"] == "vanilla"}
    out = {}
    for task in report["counts"]:
        found = []
        for r in ok:
            base = ref.get(r["threshold"])
            if base is None or r is base:
                continue
            drop = base["tasks"][task]["correct"] - r["tasks"][task]["correct"]
            if drop >= min_drop:
                found.append((r["setting"], r["tasks"][task]["accuracy"], base["tasks"][task]["accuracy"]))
        out[task] = sorted(found, key=lambda f: f[1] - f[2])
    return out


def format_losses(reports: list[dict]) -> str:
    """Markdown bullets: per checkpoint and task, vanilla under both rules, then the settings that lose."""
    lines = []
    for rep in reports:
        ok = [r for r in rep["rows"] if "error" not in r]
        ref = {r["threshold"]: r for r in ok if r["policy"] == "vanilla"}
        for task, found in losses(rep).items():
            base = ", ".join(
                f"{'fixed' if thr is None else f't={thr:g}'} {r['tasks'][task]['accuracy']:.3f}"
                for thr, r in ref.items()
            )
            lost = "; ".join(f"{name} {acc - ref_acc:+.3f} ({acc:.3f})" for name, acc, ref_acc in found)
            lost = lost or "no setting loses two or more problems"
            lines.append(f"* `{rep['name']}` {task} (vanilla: {base}): {lost}")
    return "\n".join(lines)


def plot(reports: list[dict], path: pathlib.Path) -> None:
    """Accuracy vs forward-FLOPs ratio: one panel per (checkpoint, task), one colour per policy (filled:
    fixed count, hollow: threshold), 95% intervals as error bars, SPA's ratio sweep dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rep, task) for rep in reports for task in rep["counts"]]
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols + 2.6, 4.0 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    markers = "osD^vP*Xh<>p"
    labels_seen: dict[str, object] = {}
    for ax, (rep, task) in zip(axes.flat, panels):
        ok = [r for r in rep["rows"] if "error" not in r]
        colour_of = {label: k for k, label in enumerate(dict.fromkeys(_series(r) for r in ok))}
        for r in ok:
            t = r["tasks"][task]
            k = colour_of[_series(r)]
            lo, hi = t["ci95"]
            hollow = r["threshold"] is not None
            handle = ax.errorbar(
                t["flops_ratio"], t["accuracy"], yerr=[[t["accuracy"] - lo], [hi - t["accuracy"]]],
                fmt=markers[k % len(markers)], ms=6, color=cmap(k % 20),
                mfc="white" if hollow else cmap(k % 20), mec=cmap(k % 20) if hollow else "black",
                mew=1.0, elinewidth=0.6, capsize=2, zorder=3,
            )  # fmt: skip
            labels_seen.setdefault(r["setting"], handle)
        sweep = sorted(
            (
                r
                for r in ok
                if r["policy"] == "spa" and r["threshold"] is None and "budget" not in r["kwargs"]
            ),
            key=lambda r: r["tasks"][task]["flops_ratio"],
        )
        if sweep:
            xs = [r["tasks"][task]["flops_ratio"] for r in sweep]
            ys = [r["tasks"][task]["accuracy"] for r in sweep]
            ax.plot(xs, ys, "k--", lw=0.8, zorder=2)
        low = min(r["tasks"][task]["ci95"][0] for r in ok)
        ax.set_ylim(max(0.0, low - 0.03), 1.01)
        ax.set_xlim(0, 1.05)
        ax.set_title(f"{rep['name']}: {task} ({rep['counts'][task]} problems)", fontsize=10)
        ax.set_xlabel("forward FLOPs / vanilla (fixed count)")
        ax.set_ylabel("exact-match accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    right = 1 - 2.4 / (5.0 * ncols + 2.6)  # the legend's column
    fig.legend(list(labels_seen.values()), list(labels_seen), loc="center left", bbox_to_anchor=(right, 0.5),
               fontsize=7, frameon=False)  # fmt: skip
    fig.suptitle(
        "accuracy vs compute per caching setting (filled: fixed count, hollow: threshold 0.9; "
        "bars: 95% CI; dashed: SPA ratio sweep)", fontsize=9,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0, right, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(row: dict) -> str:
    """Colour key: a policy at its defaults shares its colour across unmasking rules."""
    return row["policy"] if not row["kwargs"] else row["setting"]


def _training_line(name: str, training: dict | None) -> str:
    if not training:
        return f"`{name}`: no training.json."
    acc = training.get("final_vanilla_accuracy", {})
    diff = training.get("max_abs_logit_diff_vs_forward_dense", float("nan"))
    figures = ", ".join(f"{t} {v['accuracy']:.3f} ({v['correct']}/{v['problems']})" for t, v in acc.items())
    return (
        f"`{name}`: `{training.get('command')}` (seed {training.get('seed')}): "
        f"{training.get('parameters', 0) / 1e6:.2f}M parameters, {training.get('steps')} steps in "
        f"{training.get('train_seconds', 0) / 60:.1f} min on this CPU; vanilla exact match on "
        f"held-out problems: {figures}; the export reproduces the training module's logits under "
        f"`DiffusionLM.forward_dense` to {diff:.1e}."
    )


def _halfwidths(report: dict) -> str:
    """The widest 95% interval half-width per task (over settings), for the doc's sizing note."""
    parts = []
    for task in report["counts"]:
        widths = [(r["tasks"][task]["ci95"][1] - r["tasks"][task]["ci95"][0]) / 2
                  for r in report["rows"] if "error" not in r]  # fmt: skip
        vanilla = next(r for r in report["rows"] if r["setting"] == "vanilla")["tasks"][task]["ci95"]
        parts.append(f"{task} ±{(vanilla[1] - vanilla[0]) / 2:.3f} at vanilla, up to ±{max(widths):.3f}")
    return "; ".join(parts)


def write_doc(reports: list[dict], meta: dict) -> None:
    """docs/quality.md from the reports of :func:`evaluate` (one per checkpoint)."""
    models = "\n".join(
        f"* `{rep['name']}`: {rep['model']}; tasks {', '.join(rep['counts'])}." for rep in reports
    )
    trainings = "\n".join(f"* {_training_line(rep['name'], rep.get('training'))}" for rep in reports)
    skipped = "".join(
        f"\n* `{rep['name']}` {task}: not evaluated, its documented vanilla exact match {acc:.3f} is below "
        f"{SOLVED:g} (a task the model does not solve cannot show what a cache loses)."
        for rep in reports for task, acc in rep.get("skipped", {}).items()
    )  # fmt: skip
    untrusted = "".join(
        f"\n* `{rep['name']}` {task}: documented vanilla exact match {v['accuracy']:.3f} is below "
        f"{TRUSTED:g}, so this checkpoint is under-trained for the task: its accuracy differences show "
        "how fragile its decoding is more than what a cache loses; read the agreement with vanilla."
        for rep in reports
        for task, v in (rep.get("training") or {}).get("final_vanilla_accuracy", {}).items()
        if task in rep["counts"] and v["accuracy"] < TRUSTED
    )
    sizes = "\n".join(
        f"* `{rep['name']}`: " + ", ".join(f"{n} {t}" for t, n in rep["counts"].items())
        + f" problems (seed `EVAL_SEED`); 95% interval half-widths: {_halfwidths(rep)}; "
        f"{rep['seconds'] / 60:.1f} min."
        for rep in reports
    )  # fmt: skip
    tables = "\n\n".join(
        f"### `{rep['name']}`\n\n{format_table(rep['rows'], list(rep['counts']), markdown=True)}"
        for rep in reports
    )
    text = f"""# Generation quality of the caching policies

Generated by `{meta["command"]}` on {meta["date"]}, commit `{meta["commit"]}`, device:
{meta["device"]} (torch {meta["torch"]}, backend `torch`), {meta["seconds"] / 60:.1f} min in all.
Do not edit by hand; rerun `make eval`.

## Setting

Models (LLaDA layout, trained by `bench/train_tiny_dlm.py` with LLaDA's masked-diffusion SFT
objective on synthetic tasks with exact answers, `spacache_kernels/integrations/tiny_tasks.py`; a
command with `--block-rows 0.5` gave half of each batch semi-autoregressive block masks — clean
prefix, one block masked at rate p, masked suffix — the state block decoding is in):

{models}

Tasks (every prompt has a fixed length; the answer is followed by EOS up to gen_length):

* `add`: 4-digit addition, `0123+4567=` -> `04690`; gen_length 8, one block of 8.
* `copy`: copy a random 64-letter string; gen_length 72, blocks of 8.
* `sort`: sort 24 random digits, `3140...=` -> `0113...`; gen_length 64, blocks of 8. Every answer
  token depends on the whole prompt (how many digits are smaller).
* `count`: running count of the 1s of 32 random bits modulo 10, `1011...=` -> `1123...`; gen_length
  64, blocks of 8. Each answer digit is the previous *generated* digit plus one prompt bit, so the
  answer runs across four blocks and a stale feature of an earlier block's token breaks the chain.

Training:

{trainings}

Held-out sets and run time:

{sizes}{skipped}{untrusted}

Settings: every policy of `spacache_kernels.policies.POLICIES` at its defaults under fixed-count
unmasking (one token per step, steps = gen_length; rows named by the policy) and under Fast-dLLM's
confidence threshold 0.9 (rows `<policy> t=0.9`: the most confident masked token of the block plus
every one with confidence >= 0.9), then SPA-Cache at several `max_update_ratio` values (Gaussian budget
curve scaled so its peak is the ratio) and at ratio 1 everywhere (`budget="uniform"`), fixed count.
Greedy decoding.

Columns: exact-match accuracy with its 95% Wilson interval; token agreement with vanilla fixed-count
decoding (fraction of generated positions equal); forward FLOPs relative to vanilla fixed-count decoding
(`GenerationStats.flops`, which counts the rows each op processed, the policy's own work such as SPA's
proxy projections included); forwards per problem; tokens committed per forward (TPF, EOS padding
included, as it is decoded too); CPU seconds of the generate calls.

Ratio 1 recomputes every generated token in every layer, but it is not vanilla: between full refreshes
(every 50 steps) SPA-Cache reuses the prompt's K/V from the last full refresh (the reference rule),
while in vanilla decoding the prompt's hidden states keep changing because the prompt attends to the
tokens being decoded; with a refresh every step every policy equals vanilla token for token
(`tests/test_tiny_dlm.py`, `tests/test_tiny_dlm_deep.py`). SPA's default proxy rank 128 equals these
models' width, so its proxy here is the full value projection.

## Accuracy under parallelism

Per policy (at its defaults) and task, an AUP-style score in the manner of d3LLM's AUP: its two
operating points (TPF, accuracy) — fixed count (TPF 1) and threshold 0.9 — are joined into a curve
whose area is taken with each accuracy y weighted by `W(y) = min(1, exp(-{AUP_ALPHA:g} (1 - y / y_vanilla)))`
(`y_vanilla`: vanilla fixed-count accuracy on the task): the first point contributes `TPF * y * W(y)`,
the second the trapezoid up to its TPF. Higher is better; units are correct tokens per forward, so
vanilla fixed count at full accuracy alone scores its accuracy, and a policy earns more only by
committing several tokens per forward without losing accuracy (`bench.eval.aup`).

{format_aup(reports)}

## Where accuracy is lost

Settings at least two problems below vanilla decoding under the same unmasking rule (accuracy
difference, then accuracy), largest loss first (`bench.eval.losses`):

{format_losses(reports)}

## Results

![accuracy vs FLOPs](img/{PLOT.name})

{tables}

Raw figures: `{meta["json"]}`.

## Evaluating with lm-evaluation-harness

`spacache_kernels.integrations.lm_eval_model` is an lm-eval model named `spacache` (install with
`pip install -e '.[lm_eval]'`). lm-eval 0.4 finds external models only through its import-time
registry, so either run
`python -m spacache_kernels.integrations.lm_eval_model install-hook` once (a `.pth` import
hook; afterwards the stock `lm_eval` CLI knows `--model spacache`) or call
`python -m spacache_kernels.integrations.lm_eval_model` in place of `lm_eval`. Only `generate_until`
tasks are
supported (diffusion LMs are evaluated generatively). Any keyword the policy's constructor takes can
be given in `--model_args`.

Tiny checkpoint, CPU (a task YAML with a local data file, as `tests/test_lm_eval_model.py` does):

```bash
TINY=pretrained=checkpoints/tiny-dlm,policy=spa,gen_length=8,steps=8,block_length=8,backend=torch
lm_eval --model spacache --model_args $TINY --include_path path/to/task_dir --tasks tiny_add --batch_size 16
```

GSM8K on a GPU with LLaDA-8B-Instruct (the SPA-Cache paper's setting: 4-shot, gen 256, steps 256, block 8,
rank 128, max ratio 0.25, refresh 50 / 7):

```bash
LLADA=pretrained=/models/LLaDA-8B-Instruct,policy=spa,gen_length=256,steps=256,block_length=8
LLADA=$LLADA,proxy_rank=128,max_update_ratio=0.25,refresh_steps=50,refresh_gen_steps=7,dtype=bfloat16
lm_eval --model spacache --model_args $LLADA \\
    --tasks gsm8k --num_fewshot 4 --batch_size 16 --output_path results/gsm8k_spa
# the baseline: policy=vanilla; throughput: threshold=0.9 for Fast-dLLM-style parallel decoding
```

Data parallel over all GPUs of a node (each process takes the GPU of its `LOCAL_RANK`; lm-eval splits
the requests and gathers the results):

```bash
accelerate launch --num_processes 8 -m lm_eval --model spacache --model_args $LLADA \\
    --tasks gsm8k --num_fewshot 4 --batch_size 16
# without the hook:
# accelerate launch --num_processes 8 -m spacache_kernels.integrations.lm_eval_model <same arguments>
```
"""
    DOC.write_text(text)


def solved_tasks(checkpoint: pathlib.Path, tasks: list[str], bar: float = SOLVED) -> tuple[list, dict]:
    """Split a checkpoint's tasks by the vanilla accuracy its ``training.json`` documents: a task the
    model does not solve (below ``bar``) cannot show what a cache loses, so it is left out of the
    evaluation. Returns ``(kept task names, {skipped task: documented accuracy})``."""
    path = checkpoint / "training.json"
    documented = json.loads(path.read_text()).get("final_vanilla_accuracy", {}) if path.is_file() else {}
    kept, skipped = [], {}
    for task in tasks:
        acc = documented.get(task, {}).get("accuracy")
        if acc is not None and acc < bar:
            skipped[task] = acc
        else:
            kept.append(task)
    return kept, skipped


def _parse_counts(items: list[str]) -> dict[str, int]:
    counts = dict(COUNTS)
    for item in items:
        task, _, n = item.partition("=")
        if task not in COUNTS or not n.isdigit() or int(n) < 1:
            raise ValueError(
                f"--count: expected TASK=N with TASK in {sorted(COUNTS)} and N >= 1, got {item!r}"
            )
        counts[task] = int(n)
    return counts


def main(argv: list[str] | None = None) -> int:
    from spacache_kernels.integrations.tiny_tasks import checkpoint_tasks

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="checkpoint directory (repeatable; default: both shipped ones)")  # fmt: skip
    parser.add_argument("--count", action="append", default=[], metavar="TASK=N",
                        help=f"held-out problems of a task (repeatable; defaults {COUNTS})")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--json", default=None, help="output JSON (default bench/results/quality-*.json)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/quality.md and the plot")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="rewrite the doc and plot from a saved run's JSON; decode nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(pathlib.Path(args.render).read_text())
        _write_doc_and_plot(saved.pop("reports"), saved)
        return 0

    counts = _parse_counts(args.count)
    checkpoints = [pathlib.Path(c) for c in (args.checkpoint or CHECKPOINTS)]
    start = time.perf_counter()
    reports = []
    for checkpoint in checkpoints:
        tasks, skipped = solved_tasks(checkpoint, checkpoint_tasks(checkpoint))
        t0 = time.perf_counter()
        print(f"[eval] {checkpoint.name}: tasks {tasks}, skipped (unsolved) {skipped}", flush=True)
        report = evaluate(checkpoint, {t: counts[t] for t in tasks}, args.batch_size, args.threads)
        cfg = json.loads((checkpoint / "config.json").read_text())
        training_path = checkpoint / "training.json"
        report.update(
            name=checkpoint.name,
            checkpoint=str(checkpoint),
            model=(
                f"LLaDA-layout DLM, d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
                f"{cfg['n_heads']} heads, FFN {cfg['mlp_hidden_size']}"
            ),
            training=json.loads(training_path.read_text()) if training_path.is_file() else None,
            seconds=round(time.perf_counter() - t0, 1),
            skipped=skipped,
        )
        reports.append(report)
    meta = {
        "command": "make eval" + (f" ARGS='{' '.join(argv)}'" if argv else ""),
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "device": f"CPU ({platform.machine()}), torch threads: {torch.get_num_threads()}",
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = pathlib.Path(args.json) if args.json else RESULTS / f"quality-{stamp}.json"
    try:
        meta["json"] = str(out_json.resolve().relative_to(ROOT))
    except ValueError:
        meta["json"] = str(out_json)
    out_json.write_text(json.dumps({**meta, "reports": reports}, indent=2))
    for rep in reports:
        print(f"\n{rep['name']}\n" + format_table(rep["rows"], list(rep["counts"])))
    print("\nAUP-style scores\n" + format_aup(reports))
    print("\nLosses against vanilla under the same rule\n" + format_losses(reports))
    print(f"\nJSON: {out_json}  ({meta['seconds']:.0f} s)")
    if not args.no_doc:
        _write_doc_and_plot(reports, meta)
    return 0


def _write_doc_and_plot(reports: list[dict], meta: dict) -> None:
    plot(reports, PLOT)
    write_doc(reports, meta)
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)} (run at commit {meta['commit']})")


if __name__ == "__main__":
    sys.exit(main())
