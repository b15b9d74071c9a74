"""Behaviour fingerprint: the tokens and counted FLOPs of every registered policy (and each of its
published presets) on the tiny random-weight models, fixed-count and threshold unmasking, to JSON.

Run before and after a refactor that must not change behaviour, then compare the two files::

    python -m bench.behaviour_baseline --out /tmp/before.json
    python -m bench.behaviour_baseline --out /tmp/after.json --compare /tmp/before.json

The ragged batch (left padding) exercises the per-row bookkeeping (rows that finish early leave the
batch in threshold mode). The torch backend keeps it fast on a CPU; the kernels are checked against
it by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from spacache_kernels.generation import generate
from spacache_kernels.models.synthetic import random_model
from spacache_kernels.policies import POLICIES, make_policy

RULES = {"fixed": {}, "threshold": {"threshold": 0.05}}


def _inputs(vocab: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, min(vocab, 1000), (2, 10), generator=g)
    ids[ids == mask_id] = 1
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # a ragged batch: row 1 is left-padded
    return ids, attn


def fingerprint(shapes=("llada-tiny", "dream-tiny"), backend: str = "torch") -> dict:
    """{"shape/policy[:preset]/rule": {"tokens": [[...]], "flops": int, "steps": int}}."""
    out = {}
    for shape in shapes:
        model = random_model(shape, dtype=torch.float32, seed=3)
        ids, attn = _inputs(model.config.vocab_size, model.mask_id)
        for name in sorted(POLICIES):
            specs = [name] + [f"{name}:{p}" for p in sorted(POLICIES[name].presets)]
            for spec in specs:
                for rule, kw in RULES.items():
                    res = generate(
                        model, ids, attention_mask=attn, gen_length=32, steps=16, block_length=16,
                        policy=make_policy(spec), backend=backend, eos_token_id=5, **kw,
                    )  # fmt: skip
                    out[f"{shape}/{spec}/{rule}"] = {
                        "tokens": res.sequences.tolist(),
                        "flops": int(res.stats.flops),
                        "steps": int(res.stats.steps),
                    }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", default=None, help="a previous JSON to compare against")
    args = parser.parse_args(argv)
    result = fingerprint()
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"{len(result)} runs written to {args.out}")
    if args.compare is None:
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    diff = sorted(k for k in set(before) | set(result) if before.get(k) != result.get(k))
    for key in diff:
        print(f"DIFFERS: {key}")
    print(f"{len(before)} before, {len(result)} after, {len(diff)} differ")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
