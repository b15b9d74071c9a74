"""Command line: ``python -m spacache_kernels generate --model DIR --prompt TEXT [--prompt TEXT ...]``.

``--prompt`` is encoded with the checkpoint's tokenizer (``--tokenizer DIR`` to use another; the chat
template of a transformers tokenizer is applied unless ``--no-chat-template``) and the answers are
printed as text, one line per prompt. ``--prompt-ids 5,6,7`` takes token ids and prints ids. The
generation statistics go to stderr as one JSON line. ``--preset spa:llada-8b-gsm8k`` takes the
policy and the decoding of one published setting; ``python -m spacache_kernels presets`` lists them.
Mistakes (a bad argument, a missing checkpoint, a prompt containing the mask token) are reported the
argparse way: usage, the message, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="python -m spacache_kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="decode after one or more prompts (text or token ids)")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text; repeat the flag for a batch")
    prompts.add_argument("--prompt-ids", type=_ids, action="append",
                         help="comma-separated token ids; repeat the flag for a batch")  # fmt: skip
    gen.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="encode --prompt as plain text despite a chat template")  # fmt: skip
    which = gen.add_mutually_exclusive_group()
    which.add_argument("--policy", default=None,
                       help="a name, name:preset (e.g. spa:llada-8b-gsm8k) or package.module:Class "
                       "(default: spa)")  # fmt: skip
    which.add_argument("--preset", default=None,
                       help="a published setting (python -m spacache_kernels presets): its policy and, "
                       "where published, its decoding")  # fmt: skip
    gen.add_argument("--decode", default=None,
                     help="the decoding of a published setting (e.g. spa:llada-8b-gsm8k, "
                     "fast_dllm_dual:llada-8b-gsm8k); the options below override it")  # fmt: skip
    # Unset decoding options come from the shared DecodeConfig (the same defaults as lm-eval, bench).
    gen.add_argument("--gen-length", type=int, default=None, help="default 256")
    gen.add_argument("--steps", type=int, default=None, help="default: gen length")
    gen.add_argument("--block-length", type=int, default=None, help="default 32")
    gen.add_argument("--threshold", type=float, default=None)
    gen.add_argument("--factor", type=float, default=None)
    gen.add_argument("--temperature", type=float, default=None, help="default 0 (greedy)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (used when --temperature > 0)")
    gen.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                     help="default: $SPACACHE_BACKEND, else auto")  # fmt: skip
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--progress", action="store_true")
    gen.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture each step plan as a CUDA graph, then replay (CUDA, fixed count)",
    )
    sub.add_parser("presets", help="print the table of published settings (Markdown)")
    return parser, gen


def _generate(args) -> int:
    import torch

    from spacache_kernels.decoding import canonical_key, decode_config, published
    from spacache_kernels.generation import generate
    from spacache_kernels.models import load_model
    from spacache_kernels.text import decode_rows, encode_prompts, load_tokenizer

    policy, decode = args.policy or "spa", args.decode
    if args.preset is not None:
        policy = canonical_key(args.preset)  # unknown keys fail before the weights load
        if decode is None and published(policy).decode is not None:
            decode = policy
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.model, device=args.device, dtype=dtype)
    cfg = model.config
    tokenizer = None
    if args.prompt is not None:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        ids_known = (cfg.pad_token_id, tokenizer.pad_token_id, cfg.eos_token_id)
        pad = next((i for i in ids_known if i is not None), 0)
        chat = False if args.no_chat_template else None
        ids, mask = encode_prompts(tokenizer, args.prompt, chat_template=chat, pad_token_id=pad)
    else:
        width = max(len(p) for p in args.prompt_ids)
        ids = torch.zeros(len(args.prompt_ids), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(args.prompt_ids):  # left padding
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    decoding = decode_config(
        decode, gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        threshold=args.threshold, factor=args.factor, temperature=args.temperature, seed=args.seed,
    ).generate_kwargs()  # fmt: skip
    if decoding["eos_token_id"] is None:
        decoding["eos_token_id"] = eos
    out = generate(
        model, ids, attention_mask=mask, policy=policy, backend=args.backend, progress=args.progress,
        cuda_graph=args.cuda_graph, **decoding,
    )  # fmt: skip
    generated = out.sequences[:, ids.shape[1] :]
    if tokenizer is not None:
        for text in decode_rows(tokenizer, generated, eos):
            print(text)
    else:
        for row in generated.tolist():
            print(",".join(str(t) for t in row))
    stats = {k: v for k, v in vars(out.stats).items() if k != "layer_recomputed_tokens"}
    print(json.dumps(stats), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, gen = _parser()
    args = parser.parse_args(argv)
    if args.command == "presets":
        from spacache_kernels.decoding import preset_table

        print(preset_table(), end="")
        return 0
    try:
        return _generate(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as err:
        gen.error(str(err))  # usage + message on stderr, exit code 2: a user error, not a crash
    return 2  # pragma: no cover - gen.error exits


if __name__ == "__main__":
    sys.exit(main())
