"""``make eval`` / ``python -m bench.eval``: generation quality of every caching policy on a trained model.

For every policy in ``spacache_kernels.policies.POLICIES`` (with its defaults) and for SPA-Cache at
several update ratios, decode a fixed held-out set of each task of the tiny trained checkpoint
(``checkpoints/tiny-dlm``, :mod:`spacache_kernels.tiny_dlm`) and report, per task:

* exact-match accuracy;
* token agreement with vanilla decoding (fraction of generated tokens equal to vanilla's);
* forward-FLOPs ratio vs vanilla (``GenerationStats.flops``, counted from the rows each op processed,
  so it includes the policy's own work such as the proxy projections);
* CPU seconds (``time.process_time`` of the generate calls; the torch backend on this machine).

A policy that raises for a setting is recorded with its error instead of stopping the run.
Writes ``bench/results/quality-<stamp>.json``, ``docs/quality.md`` and ``docs/img/quality_acc_vs_flops.png``.
Decoding: fixed-count unmasking, one token per step (steps = gen_length), semi-autoregressive blocks
of 8, greedy, ``backend="torch"`` (the Triton interpreter is far too slow on a CPU).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
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
SPA_RATIOS = (0.1, 0.25, 0.5, 1.0)


def settings(ratios=SPA_RATIOS) -> list[tuple[str, str, dict]]:
    """``(label, registry name, constructor kwargs)``: every registered policy, then SPA's ratio sweep."""
    from spacache_kernels.policies import POLICIES

    out = [(name, name, {}) for name in POLICIES]
    if "spa" in POLICIES:
        out += [(f"spa r={r:g}", "spa", {"max_update_ratio": r}) for r in ratios]
        out.append(("spa r=1 uniform", "spa", {"max_update_ratio": 1.0, "budget": "uniform"}))
    return out


def run_setting(model, tok, sets: dict, name: str, kwargs: dict, batch_size: int) -> dict:
    """Decode every task's problems with one policy setting. Returns per-task figures and sequences."""
    from spacache_kernels.policies import make_policy
    from spacache_kernels.tiny_dlm import decode_problems, exact_match

    per_task = {}
    for task, probs in sets.items():
        correct, flops, cpu, wall, gens = 0, 0, 0.0, 0.0, []
        for start in range(0, len(probs), batch_size):
            chunk = probs[start : start + batch_size]
            policy = make_policy(name, **kwargs)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            gen, out = decode_problems(model, tok, chunk, policy)
            cpu += time.process_time() - cpu0
            wall += time.perf_counter() - wall0
            correct += sum(exact_match(tok, chunk, gen))
            flops += out.stats.flops
            gens.append(gen)
        per_task[task] = {
            "problems": len(probs),
            "correct": correct,
            "accuracy": correct / len(probs),
            "flops": flops,
            "cpu_seconds": cpu,
            "wall_seconds": wall,
            "generated": torch.cat(gens),
        }
    return per_task


def evaluate(checkpoint, counts: dict[str, int], batch_size: int, threads: int) -> dict:
    from spacache_kernels.models import load_model
    from spacache_kernels.tiny_dlm import CharTokenizer, heldout_problems

    torch.set_num_threads(threads)
    model = load_model(checkpoint, dtype=torch.float32)
    tok = CharTokenizer.load(checkpoint)
    sets = {task: heldout_problems(task, n) for task, n in counts.items()}
    rows, vanilla = [], None
    for label, name, kwargs in [("vanilla", "vanilla", {})] + [s for s in settings() if s[0] != "vanilla"]:
        row = {"setting": label, "policy": name, "kwargs": kwargs}
        try:
            per_task = run_setting(model, tok, sets, name, kwargs, batch_size)
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
                "correct": fig["correct"],
                "problems": fig["problems"],
                "agreement": float((fig["generated"] == ref["generated"]).float().mean()),
                "flops_ratio": fig["flops"] / ref["flops"],
                "flops": fig["flops"],
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
    return {"rows": rows, "counts": counts}


def _summary(row: dict) -> str:
    parts = [
        f"{task} acc {t['accuracy']:.3f} agree {t['agreement']:.3f} flops {t['flops_ratio']:.3f}"
        for task, t in row["tasks"].items()
    ]
    return " | ".join(parts) + f" | cpu {row['cpu_seconds']:.1f}s"


def format_table(rows: list[dict], tasks: list[str], markdown: bool = False) -> str:
    """One line per setting: per task accuracy / agreement / FLOPs ratio, then CPU seconds."""
    head = ["setting"]
    for task in tasks:
        head += [f"{task} acc", f"{task} agree", f"{task} FLOPs"]
    head += ["all acc", "all FLOPs", "CPU s"]
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([row["setting"], f"error: {row['error']}"] + [""] * (len(head) - 2))
            continue
        line = [row["setting"]]
        for task in tasks:
            t = row["tasks"][task]
            line += [f"{t['accuracy']:.3f}", f"{t['agreement']:.3f}", f"{t['flops_ratio']:.3f}"]
        line += [f"{row['accuracy']:.3f}", f"{row['flops_ratio']:.3f}", f"{row['cpu_seconds']:.1f}"]
        cells.append(line)
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


def plot(rows: list[dict], tasks: list[str], path: pathlib.Path) -> None:
    """Accuracy vs forward-FLOPs ratio: one panel per task, one marker per setting, SPA's sweep joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 2.6, 4.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    markers = "osD^vP*Xh<>p"
    for ax, task in zip(axes[0], tasks):
        for k, r in enumerate(ok):
            t = r["tasks"][task]
            ax.scatter(
                t["flops_ratio"], t["accuracy"], s=46, color=cmap(k % 20), marker=markers[k % len(markers)],
                label=r["setting"], edgecolors="black", linewidths=0.4, zorder=3,
            )  # fmt: skip
        sweep = sorted(
            (r for r in ok if r["policy"] == "spa" and r["kwargs"] and "budget" not in r["kwargs"]),
            key=lambda r: r["tasks"][task]["flops_ratio"],
        )
        if sweep:
            xs = [r["tasks"][task]["flops_ratio"] for r in sweep]
            ys = [r["tasks"][task]["accuracy"] for r in sweep]
            ax.plot(xs, ys, "k--", lw=0.8, zorder=2)
        low = min(r["tasks"][task]["accuracy"] for r in ok)
        ax.set_ylim(max(0.0, low - 0.05), 1.005 + 0.01 * (low < 1))
        ax.set_xlim(0, 1.05)
        ax.set_title(f"{task} ({ok[0]['tasks'][task]['problems']} problems)")
        ax.set_xlabel("forward FLOPs / vanilla")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    right = 1 - 2.4 / (4.2 * len(tasks) + 2.6)  # the legend's column
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(right, 0.5), fontsize=8, frameon=False)
    fig.suptitle("tiny-dlm: accuracy vs compute per caching setting (dashed: SPA ratio sweep)", fontsize=10)
    fig.tight_layout(rect=(0, 0, right, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_doc(report: dict, table_md: str, training: dict | None) -> None:
    counts = ", ".join(f"{n} {t}" for t, n in report["counts"].items())
    train_lines = ""
    if training:
        acc = training.get("final_vanilla_accuracy", {})
        diff = training.get("max_abs_logit_diff_vs_forward_dense", float("nan"))
        figures = ", ".join(
            f"{t} {v['accuracy']:.3f} ({v['correct']}/{v['problems']})" for t, v in acc.items()
        )
        train_lines = (
            f"Training (`{training.get('command')}`): {training.get('parameters', 0) / 1e6:.2f}M parameters, "
            f"{training.get('steps')} steps in {training.get('train_seconds', 0) / 60:.1f} min on this CPU; "
            f"vanilla exact match on {list(acc.values())[0]['problems'] if acc else '?'} held-out problems "
            f"per task: {figures}. The exported checkpoint reproduces the training module's logits under "
            f"`DiffusionLM.forward_dense` to {diff:.1e}.\n"
        )
    text = f"""# Generation quality of the caching policies

Generated by `{report["command"]}` on {report["date"]}, commit `{report["commit"]}`, device:
{report["device"]} (torch {report["torch"]}, backend `torch`). Do not edit by hand; rerun `make eval`.

## Setting

Model: `checkpoints/tiny-dlm`, a {report["model"]} trained by `bench/train_tiny_dlm.py` with LLaDA's
masked-diffusion SFT objective on synthetic tasks with exact answers
(`spacache_kernels/tiny_dlm.py`):

* `add`: 4-digit addition, `0123+4567=` -> `04690` (+ EOS padding; gen_length 8);
* `copy`: copy a random 64-letter string (long context; prompt 65 tokens, gen_length 72).

{train_lines}
Held-out set: {counts} problems (seed `EVAL_SEED`). Decoding: greedy, fixed-count unmasking with one
token per step (steps = gen_length), blocks of 8. Columns: exact-match accuracy, token agreement with
vanilla decoding, forward FLOPs relative to vanilla (`GenerationStats.flops`, which counts the rows each
op processed, the policy's proxy work included), CPU seconds of the generate calls. The policies come
from `spacache_kernels.policies.POLICIES` (defaults), plus SPA-Cache at several `max_update_ratio`
values (Gaussian budget curve scaled so its peak is the ratio) and at ratio 1 everywhere
(`budget="uniform"`). Ratio 1 recomputes every generated token in every layer, but it is not vanilla:
between full refreshes (every 50 steps) SPA-Cache reuses the prompt's K/V from the last full refresh
(the reference rule), while in vanilla decoding the prompt's hidden states keep changing because the
prompt attends to the tokens being decoded; with `refresh_steps=1` it equals vanilla token for token
(`tests/test_tiny_dlm.py`). SPA's default proxy rank 128 equals this model's width, so its proxy here
is the full value projection.

## Results

{table_md}

![accuracy vs FLOPs](img/{PLOT.name})

Raw figures: `{report["json"]}`.

## Evaluating with lm-evaluation-harness

`spacache_kernels.lm_eval_model` is an lm-eval model named `spacache` (install with
`pip install -e '.[lm_eval]'`). lm-eval 0.4 finds external models only through its import-time
registry, so either run `python -m spacache_kernels.lm_eval_model install-hook` once (a `.pth` import
hook; afterwards the stock `lm_eval` CLI knows `--model spacache`) or call
`python -m spacache_kernels.lm_eval_model` in place of `lm_eval`. Only `generate_until` tasks are
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
# without the hook: accelerate launch --num_processes 8 -m spacache_kernels.lm_eval_model <same arguments>
```
"""
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tiny-dlm"))
    parser.add_argument("--add", type=int, default=256, help="held-out addition problems")
    parser.add_argument("--copy", type=int, default=64, help="held-out copy problems")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    parser.add_argument("--json", default=None, help="output JSON (default bench/results/quality-*.json)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/quality.md and the plot")
    args = parser.parse_args(argv)

    counts = {"add": args.add, "copy": args.copy}
    start = time.perf_counter()
    report = evaluate(args.checkpoint, counts, args.batch_size, args.threads)
    tasks = list(counts)
    model_cfg = json.loads((pathlib.Path(args.checkpoint) / "config.json").read_text())
    report.update(
        command="make eval" + (f" ARGS='{' '.join(argv)}'" if argv else ""),
        date=_dt.date.today().isoformat(),
        commit=git_commit(),
        device=f"CPU ({platform.machine()}), torch threads: {torch.get_num_threads()}",
        torch=torch.__version__,
        checkpoint=str(args.checkpoint),
        model=(
            f"LLaDA-layout DLM (d_model {model_cfg['d_model']}, {model_cfg['n_layers']} layers, "
            f"{model_cfg['n_heads']} heads, FFN {model_cfg['mlp_hidden_size']})"
        ),
        seconds=round(time.perf_counter() - start, 1),
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = pathlib.Path(args.json) if args.json else RESULTS / f"quality-{stamp}.json"
    try:
        report["json"] = str(out_json.resolve().relative_to(ROOT))
    except ValueError:
        report["json"] = str(out_json)
    out_json.write_text(json.dumps(report, indent=2))
    print()
    print(format_table(report["rows"], tasks))
    print(f"\nJSON: {out_json}  ({report['seconds']:.0f} s)")
    if not args.no_doc:
        training_path = pathlib.Path(args.checkpoint) / "training.json"
        training = json.loads(training_path.read_text()) if training_path.is_file() else None
        plot(report["rows"], tasks, PLOT)
        write_doc(report, format_table(report["rows"], tasks, markdown=True), training)
        print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
