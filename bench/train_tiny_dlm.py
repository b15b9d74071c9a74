"""Train the tiny LLaDA-layout masked diffusion LMs shipped in ``checkpoints/tiny-dlm`` and ``-deep``.

    .venv/bin/python -m bench.train_tiny_dlm --out checkpoints/tiny-dlm --steps 1500 --max-minutes 28 \\
        --eval-every 250 --threads 1 --log-every 10

is the command that produced ``checkpoints/tiny-dlm`` (4 layers; tasks ``add`` and ``copy``; recorded in
its ``training.json``): 1500 steps, 22 minutes on a shared 2-core CPU including the periodic
evaluations. ``checkpoints/tiny-dlm-deep`` (8 layers; tasks ``sort`` and ``count``, answers over
several blocks of 8) came from one run from scratch,

    .venv/bin/python -m bench.train_tiny_dlm --out checkpoints/tiny-dlm-deep --tasks sort,count \\
        --n-layers 8 --steps 4300 --lr 1e-3 --max-minutes 40 --eval-every 1000 --eval-problems 32 \\
        --final-eval 128 --threads 2 --log-every 50 --task-batch 32 --block-rows 0.5

(its ``training.json`` has the steps reached and the time), on an otherwise idle 2-core machine.
Half of each of its batches holds semi-autoregressive block masks (``--block-rows``, see
:func:`llada_sft_loss`): with LLaDA's iid masks alone, earlier 8-layer runs (125 minutes in all) decoded
the whole answer as one block almost perfectly but blocks of 8 at 61% / 45% exact, because iid masks
never show a clean prefix in front of a fully masked suffix. On a machine where other processes hold the
cores, ``--threads 1`` can be several times faster than two (OpenMP threads spin at barriers).
``--seed`` fixes the initialization, the problem streams and the masks (CPU float results can still
differ across thread counts); ``--max-minutes`` stops early, so on a busier machine the same command
may stop at fewer steps.

Model: LLaDA's block exactly (bidirectional attention, RMSNorm, SwiGLU ``silu(ff_proj(x)) *
up_proj(x)``, rotate-half RoPE, no biases, untied LM head), written in plain PyTorch with LLaDA's
parameter names, so ``state_dict()`` *is* a LLaDA checkpoint that ``spacache_kernels.models.load_model``
reads; :func:`check_against_runtime` asserts that the exported weights reproduce this module's logits
under ``DiffusionLM.forward_dense``.

Objective: LLaDA's SFT loss. Per sequence a masking level ``t ~ U(0, 1]`` gives ``p = (1 - eps) t +
eps``; each *answer* token (the answer and its EOS padding; the prompt is never masked) is replaced by
``<mask>`` with probability ``p``; the loss is the cross-entropy on the masked tokens weighted by
``1 / p``, summed per sequence, divided by the sequence's answer length and averaged over the batch.
``--block-rows`` turns a fraction of each batch into semi-autoregressive rows (one block partly
masked behind a clean prefix, everything after it masked, the same weighting over that block).

Tasks (``spacache_kernels.integrations.tiny_tasks``, ``--tasks``; default 4-digit addition and
64-letter copy): one batch of each per optimizer step, fresh problems every step from
``TRAIN_SEED``. Exact-match accuracy under vanilla decoding (``generate(..., policy="vanilla",
backend="torch")``, one token per step) is measured on held-out problems from ``EVAL_SEED`` during
training and at the end, and written to the checkpoint's ``training.json`` (with the task list,
which ``tiny_tasks.checkpoint_tasks`` reads). """

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spacache_kernels.integrations.tiny_tasks import (
    TASKS,
    TRAIN_SEED,
    decode_problems,
    encode_batch,
    exact_match,
    heldout_problems,
    problems,
)
from spacache_kernels.models.char_tokenizer import CharTokenizer
from spacache_kernels.models.rope import rope_tables

MASK_EPS = 1e-3  # LLaDA's forward process: p_mask = (1 - eps) * t + eps


# ------------------------------------------------------------------------------------------------
# model (LLaDA layout)
# ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (LLaDA: affine, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x (B, H, T, Dh); cos/sin (T, Dh) with equal halves."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    """One LLaDA 'llama' block: pre-norm bidirectional attention and pre-norm SwiGLU FFN."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = RMSNorm(d_model, eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.ff_norm = RMSNorm(d_model, eps)
        self.ff_proj = nn.Linear(d_model, ffn_dim, bias=False)  # gate
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.ff_out = nn.Linear(ffn_dim, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); cos/sin (T, Dh)."""
        batch, length, d = x.shape
        h = self.attn_norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, H, T, Dh)
            return t.view(batch, length, self.n_heads, d // self.n_heads).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(h)), cos, sin)
        k = apply_rope(heads(self.k_proj(h)), cos, sin)
        v = heads(self.v_proj(h))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # bidirectional, scale Dh^-0.5
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class TinyLLaDA(nn.Module):
    """LLaDA-layout masked diffusion LM; ``state_dict()`` keys are LLaDA's checkpoint names.

    Args: see :func:`llada_config` (``d_model``, ``n_layers``, ``n_heads``, ``mlp_hidden_size``,
    ``embedding_size``, ``rope_theta``, ``rms_norm_eps``, ``max_sequence_length``).
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        d, layers = config["d_model"], config["n_layers"]
        eps = config["rms_norm_eps"]
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        tr = self.model.transformer
        tr.wte = nn.Embedding(config["embedding_size"], d)
        tr.blocks = nn.ModuleList(
            Block(d, config["n_heads"], config["mlp_hidden_size"], eps) for _ in range(layers)
        )
        tr.ln_f = RMSNorm(d, eps)
        tr.ff_out = nn.Linear(d, config["embedding_size"], bias=False)  # LM head (untied, as LLaDA-8B)
        cos, sin = rope_tables(
            d // config["n_heads"], config["max_sequence_length"], float(config["rope_theta"])
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2 style: N(0, 0.02); the residual-branch outputs scaled by 1/sqrt(2 L) so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual_out = name.endswith(("attn_out.weight", "ff_out.weight"))
                std = 0.02 / math.sqrt(2 * layers) if residual_out else 0.02
                if name == "model.transformer.ff_out.weight":  # the LM head, not a residual branch
                    std = 0.02
                nn.init.normal_(p, std=std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 (no padding) -> logits (B, T, V) fp32; logit i predicts token i."""
        tr = self.model.transformer
        length = input_ids.shape[1]
        limit = self.rope_cos.shape[0]
        if length > limit:
            raise ValueError(f"input_ids: length {length} exceeds max_sequence_length {limit}")
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x = tr.wte(input_ids)
        for block in tr.blocks:
            x = block(x, cos, sin)
        return tr.ff_out(tr.ln_f(x))


def llada_config(
    tok: CharTokenizer,
    *,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    mlp_hidden_size: int = 384,
    max_sequence_length: int = 192,
    rope_theta: float = 10000.0,
) -> dict:
    """config.json in LLaDA-8B-Instruct's field names and values (shapes and special ids our own)."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "architectures": ["LLaDAModelLM"],
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": d_model,
        "embedding_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": tok.mask_token_id,
        "max_sequence_length": max_sequence_length,
        "mlp_hidden_size": mlp_hidden_size,
        "mlp_ratio": mlp_hidden_size // d_model,
        "model_type": "llada",
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "n_layers": n_layers,
        "pad_token_id": tok.pad_token_id,
        "rms_norm_eps": 1e-5,
        "rope": True,
        "rope_theta": rope_theta,
        "scale_logits": False,
        "torch_dtype": "float32",
        "vocab_size": tok.vocab_size,
        "weight_tying": False,
    }


# ------------------------------------------------------------------------------------------------
# objective
# ------------------------------------------------------------------------------------------------
def llada_sft_loss(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
    eps: float = MASK_EPS,
    block_length: int | None = None,
    block_rows: float = 0.0,
) -> torch.Tensor:
    """LLaDA's SFT loss on one batch (scalar), optionally with semi-autoregressive rows.

    prompt_ids (B, P), answer_ids (B, G) int64. Per row ``t ~ U(0, 1)``, ``p = (1 - eps) t + eps``.

    * iid rows (LLaDA's SFT objective): answer tokens are masked independently with probability p;
      the row's loss is ``sum_{masked i} CE_i / p / G``.
    * block rows (the first ``round(block_rows * B)`` rows; needs ``block_length``, which divides G):
      the state semi-autoregressive decoding is in when it works on block b. A block b is drawn
      uniformly, the answer before it is clean, every token after it is ``<mask>``, and the tokens of
      block b are masked independently with probability p; the row's loss is ``sum_{masked i in b}
      CE_i / p / block_length`` (the same 1/p-weighted masked cross-entropy, restricted to the block
      being denoised, as in block diffusion). iid masks almost never leave a long fully masked suffix
      behind a clean prefix, so a model trained on them alone decodes one block of the whole answer
      well and blocks of 8 much worse; these rows close that gap.

    The loss is the mean of the row losses. A row where nothing was masked contributes 0.
    """
    batch, gen = answer_ids.shape
    t = torch.rand(batch, 1, generator=generator)
    p_mask = (1 - eps) * t + eps  # (B, 1)
    masked = torch.rand(batch, gen, generator=generator) < p_mask  # (B, G)
    weight = masked / (p_mask * gen)  # (B, G) per-token loss weight
    n_block = round(block_rows * batch) if block_length else 0
    if n_block:
        if gen % block_length:
            raise ValueError(f"block_length: expected a divisor of the answer length {gen}, "
                             f"got {block_length}")  # fmt: skip
        blocks = torch.randint(gen // block_length, (n_block, 1), generator=generator)
        pos = torch.arange(gen).unsqueeze(0) // block_length  # (1, G) block index of each position
        scored = masked[:n_block] & (pos == blocks)  # (n_block, G): the block's own masked tokens
        masked[:n_block] = scored | (pos > blocks)
        weight[:n_block] = scored / (p_mask[:n_block] * block_length)
    noisy = torch.where(masked, torch.full_like(answer_ids, mask_id), answer_ids)
    logits = model(torch.cat([prompt_ids, noisy], dim=1))[:, prompt_ids.shape[1] :]  # (B, G, V)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer_ids.reshape(-1), reduction="none")
    return (ce.view(batch, gen) * weight).sum() / batch


# ------------------------------------------------------------------------------------------------
# export / verification / evaluation
# ------------------------------------------------------------------------------------------------
def export(model: TinyLLaDA, tok: CharTokenizer, out: Path, extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors (LLaDA names) + char_tokenizer.json into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.json", "w") as fh:
        json.dump(model.config, fh, indent=2)
    tensors = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", **(extra or {})})
    tok.save(out)
    return out


@torch.no_grad()
def check_against_runtime(model: TinyLLaDA, directory: Path, ids: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |logits| difference between this module and ``load_model(directory).forward_dense``.

    ids (B, T). Raises AssertionError above ``atol`` (fp32 both sides).
    """
    from spacache_kernels.models import load_model

    runtime = load_model(directory, dtype=torch.float32)
    model.eval()
    ours = model(ids)
    theirs = runtime.forward_dense(ids)
    diff = float((ours - theirs).abs().max())
    if diff > atol:
        raise AssertionError(f"exported checkpoint differs from the training module: max |diff| {diff:.3g}")
    return diff


@torch.no_grad()
def evaluate(runtime, tok: CharTokenizer, task: str, count: int, seed: int, batch_size: int = 64) -> dict:
    """Exact-match accuracy of vanilla decoding (one token per step) on ``count`` held-out problems."""
    probs = heldout_problems(task, count, seed)
    correct = 0
    for start in range(0, count, batch_size):
        chunk = probs[start : start + batch_size]
        correct += sum(exact_match(tok, chunk, decode_problems(runtime, tok, chunk)[0]))
    return {"task": task, "problems": count, "correct": correct, "accuracy": correct / count}


# ------------------------------------------------------------------------------------------------
def parse_tasks(spec: str) -> list[str]:
    """``"sort,chain"`` -> ``["sort", "chain"]``; ValueError naming an unknown task."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise ValueError(f"tasks: expected comma-separated names from {sorted(TASKS)}, got {spec!r}")
    return names


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = CharTokenizer(vocab_size=args.vocab_size)
    config = llada_config(
        tok,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        mlp_hidden_size=args.ffn_dim,
    )
    model = TinyLLaDA(config)
    if args.init:  # continue from an exported checkpoint (same shape); a fresh optimizer and schedule
        from safetensors.torch import load_file

        state = load_file(str(Path(args.init) / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"--init: {args.init} does not match the model (missing {missing}, "
                             f"unexpected {unexpected})")  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:  # linear warmup then cosine to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    tasks = parse_tasks(args.tasks)
    streams = {name: random.Random(f"{name}:{TRAIN_SEED}:{args.seed}") for name in tasks}
    # add/copy keep their own flags (the shipped tiny-dlm command); every other task uses --task-batch
    batch_sizes = {name: {"add": args.add_batch, "copy": args.copy_batch}.get(name, args.task_batch)
                   for name in tasks}  # fmt: skip
    out = Path(args.out)
    log: list[dict] = []
    start = time.perf_counter()
    shape = {k: config[k] for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size")}
    print(f"[train] {n_params / 1e6:.2f}M params, {shape}", flush=True)
    step = 0
    running = {name: 0.0 for name in tasks}
    for step in range(args.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        total = 0.0
        for name in tasks:
            batch = [TASKS[name].make(streams[name]) for _ in range(batch_sizes[name])]
            prompt_ids, answer_ids = encode_batch(tok, batch)
            loss = llada_sft_loss(
                model, prompt_ids, answer_ids, tok.mask_token_id, gen,
                block_length=TASKS[name].block_length, block_rows=args.block_rows,
            )  # fmt: skip
            value = float(loss.detach())
            running[name] = 0.98 * running[name] + 0.02 * value if step else value  # smoothed, for the log
            total = total + loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.perf_counter() - start
        if step % args.log_every == 0 or step == args.steps - 1:
            losses = " ".join(f"{k}={v:.4f}" for k, v in running.items())
            print(f"[train] step {step} lr {lr_at(step):.2e} loss {losses} ({elapsed:.0f}s)", flush=True)
        # Periodic progress check on a few problems; the final model is evaluated once, after the loop.
        if args.eval_every and step and step % args.eval_every == 0 and step != args.steps - 1:
            export(model, tok, out)
            from spacache_kernels.models import load_model

            runtime = load_model(out, dtype=torch.float32)
            count = args.eval_problems
            accs = {name: evaluate(runtime, tok, name, count, args.eval_seed)["accuracy"] for name in tasks}
            entry = {"step": step, "seconds": round(elapsed, 1), "loss": dict(running), "accuracy": accs}
            log.append(entry)
            print(f"[eval] step {step}: {accs}", flush=True)
        if args.max_steps and step + 1 >= args.max_steps:
            print(f"[train] --max-steps {args.max_steps} reached", flush=True)
            break
        if args.max_minutes and elapsed > args.max_minutes * 60:
            print(f"[train] time budget of {args.max_minutes} min reached at step {step}", flush=True)
            break
    train_seconds = time.perf_counter() - start
    # Final: export, check the export against the runtime, evaluate on the full held-out set.
    export(model, tok, out)
    probe = torch.cat(encode_batch(tok, problems(tasks[-1], 2, seed=7)), dim=1)
    probe[:, -20:] = tok.mask_token_id
    diff = check_against_runtime(model, out, probe)
    from spacache_kernels.models import load_model

    runtime = load_model(out, dtype=torch.float32)
    final = {name: evaluate(runtime, tok, name, args.final_eval, args.eval_seed) for name in tasks}
    report = {
        "command": "python -m bench.train_tiny_dlm " + " ".join(args.argv),
        "seed": args.seed,
        "threads": args.threads,
        "tasks": tasks,
        "init": args.init,
        "steps": step + 1,
        "train_seconds": round(train_seconds, 1),
        "parameters": n_params,
        "batch_sizes": batch_sizes,
        "lr": args.lr,
        "block_rows": args.block_rows,
        "max_abs_logit_diff_vs_forward_dense": diff,
        "final_vanilla_accuracy": final,
        "eval_seed": args.eval_seed,
        "log": log,
    }
    with open(out / "training.json", "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps({k: report[k] for k in ("steps", "train_seconds", "final_vanilla_accuracy")}, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="checkpoints/tiny-dlm")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop early after this (0: never)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many updates (0: --steps)")
    parser.add_argument("--init", default=None, help="start from this checkpoint's weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=384)
    parser.add_argument("--vocab-size", type=int, default=48)
    parser.add_argument("--add-batch", type=int, default=128)
    parser.add_argument("--copy-batch", type=int, default=16)
    parser.add_argument("--tasks", default="add,copy", help="comma-separated names from tiny_dlm.TASKS")
    parser.add_argument("--task-batch", type=int, default=32, help="batch of every task but add/copy")
    parser.add_argument(
        "--block-rows",
        type=float,
        default=0.0,
        help="fraction of each batch with semi-AR block masks (0: LLaDA's iid masks only)",
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-problems", type=int, default=32)
    parser.add_argument("--final-eval", type=int, default=256)
    parser.add_argument("--eval-seed", type=int, default=99)
    args = parser.parse_args(argv)
    args.argv = argv
    return train(args)


if __name__ == "__main__":
    main()
