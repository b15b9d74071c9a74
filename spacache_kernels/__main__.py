"""Command line: ``python -m spacache_kernels generate --model DIR --prompt-ids 1,2,3 --policy spa``."""

from __future__ import annotations

import argparse
import json
import sys


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--prompt-ids: expected integers, got {text!r}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spacache_kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="decode after one or more prompts given as token ids")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    gen.add_argument("--prompt-ids", type=_ids, action="append", required=True,
                     help="comma-separated token ids; repeat the flag for a batch")  # fmt: skip
    gen.add_argument("--policy", default="spa")
    gen.add_argument("--gen-length", type=int, default=64)
    gen.add_argument("--steps", type=int, default=64)
    gen.add_argument("--block-length", type=int, default=8)
    gen.add_argument("--threshold", type=float, default=None)
    gen.add_argument("--factor", type=float, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                     help="default: $SPACACHE_BACKEND, else auto")  # fmt: skip
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"])
    gen.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from spacache_kernels.generate import generate
    from spacache_kernels.models import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.model, device=args.device, dtype=dtype)
    width = max(len(p) for p in args.prompt_ids)
    ids = torch.zeros(len(args.prompt_ids), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(args.prompt_ids):  # left padding
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = generate(
        model, ids, attention_mask=mask, gen_length=args.gen_length, steps=args.steps,
        block_length=args.block_length, policy=args.policy, threshold=args.threshold, factor=args.factor,
        temperature=args.temperature, eos_token_id=model.config.eos_token_id, backend=args.backend,
        progress=args.progress,
    )  # fmt: skip
    for row in out.sequences[:, width:].tolist():
        print(",".join(str(t) for t in row))
    stats = {k: v for k, v in vars(out.stats).items() if k != "layer_recomputed_tokens"}
    print(json.dumps(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
