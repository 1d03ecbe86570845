"""First and last residual-stream variance of the reference transformers (Pre-LN, Post-LN, NF) beside their theory.

The transformer analogue of the paper's Figure 1, as numbers: Pre-LN grows linearly with depth, Post-LN stays flat
(read before its norms), NF follows 1 + k alpha^2. For each family and depth it records the SPP with spp's hooks
and prints the stem, the first tap (after layer 1's attention) and the last tap (after the last MLP): measured
per-channel variance, the theory over infinitely many sequences (``expected_var``) and the theory as a batch of
``--batch-size`` sequences reads it (``TapTheory.at_batch``).

    python examples/transformer_references.py                        # depths 12 and 48, width 256, 128 tokens
    python examples/transformer_references.py --depths 6 --width 64 --seq-len 16 --batch-size 8 --input gaussian
"""

from __future__ import annotations

import argparse
import time

import torch

import spp.hooks
from spp.models import TRANSFORMER_DEPTHS, create_model
from spp.models.transformer import transformer_taps

FAMILIES = ("preln_transformer", "postln_transformer", "nf_transformer")


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Build ``name`` (seeded), record it on random token ids or Gaussian embeddings, return the numbers."""
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = create_model(name, width=args.width, seq_len=args.seq_len)
    gen = torch.Generator().manual_seed(args.seed + 1)
    if args.input == "tokens":
        x = torch.randint(0, model.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    else:
        x = torch.randn(args.batch_size, args.seq_len, args.width, generator=gen)
    rows = spp.hooks.record(model, x, taps=transformer_taps(model), mode="eval").rows
    first, last = model.spp_theory[0], model.spp_theory[-1]
    return {
        "stem": rows[0]["avg_var"],
        "first": rows[1]["avg_var"], "first_theory": first.var, "first_batch": first.at_batch(args.batch_size)[0],
        "last": rows[-1]["avg_var"], "last_theory": last.var, "last_batch": last.at_batch(args.batch_size)[0],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> list[tuple[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 48], choices=TRANSFORMER_DEPTHS,
                        help="numbers of layers (12 48)")
    parser.add_argument("--width", type=int, default=256, help="d_model (256, the references' default)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (128, the default)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences (4)")
    parser.add_argument("--input", choices=("tokens", "gaussian"), default="tokens",
                        help="uniformly random token ids, or N(0, 1) embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"width {args.width}, {args.seq_len} tokens, {args.batch_size} sequences of {args.input}, seed {args.seed}")
    print(f"{'model':<22} {'stem':>6} | {'first':>7} {'theory':>7} {'@batch':>7} | {'last':>8} {'theory':>8} "
          f"{'@batch':>8} | {'s':>5}")
    results = []
    for depth in args.depths:
        for family in FAMILIES:
            name = f"{family}{depth}"
            r = measure(name, args)
            results.append((name, r))
            print(f"{name:<22} {r['stem']:6.3f} | {r['first']:7.3f} {r['first_theory']:7.3f} {r['first_batch']:7.3f} "
                  f"| {r['last']:8.3f} {r['last_theory']:8.3f} {r['last_batch']:8.3f} | {r['seconds']:5.1f}")
    return results


if __name__ == "__main__":
    main()
