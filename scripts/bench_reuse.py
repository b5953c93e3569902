#!/usr/bin/env python3
"""Time to first token of a second question about the same long document (prefix reuse).

    python scripts/bench_reuse.py [--model smollm2-135m] [--tokens 4000] [--repeat 3]
                                  [--threads 2] [--dense]

The document is the start of the pinned evaluation corpus, cut to --tokens tokens. Each
repetition clears the context, asks question 1 (the whole document is evaluated) and then
question 2 (only the question is), so the two are measured side by side; printed: each pair,
the best of each and the ratio of the bests (target: <= 0.2 with SparseK on).
"""

from __future__ import annotations

import argparse

from llama_sparsek import Llama, SparseK, corpus, models

QUESTIONS = (
    "\n\nQuestion: in which town was Shakespeare born?\nAnswer:",
    "\n\nQuestion: whom did Shakespeare marry?\nAnswer:",
)


def document(llm: Llama, n_tokens: int) -> str:
    text = corpus.load_text()
    tokens = llm.tokenize(text[: n_tokens * 8], add_special=False)[:n_tokens]
    return llm.detokenize(tokens)


def measure(llm: Llama, doc: str, repeat: int) -> list[tuple[float, float, int]]:
    pairs = []
    for _ in range(repeat):
        llm.reset()
        ttft = []
        for question in QUESTIONS:
            llm.generate(doc + question, 1)
            timings = llm.last_timings
            assert timings is not None and timings.first_token_s is not None
            ttft.append(timings.first_token_s)
        assert timings is not None
        pairs.append((ttft[0], ttft[1], timings.reused_tokens))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="Also measure dense attention.")
    args = parser.parse_args()
    path = models.resolve(args.model)
    settings: list[SparseK | None] = [SparseK()] + ([None] if args.dense else [])
    for sparsek in settings:
        name = "dense" if sparsek is None else f"SparseK {sparsek}"
        with Llama(path, n_ctx=8192, n_threads=args.threads, sparsek=sparsek) as llm:
            doc = document(llm, args.tokens)
            pairs = measure(llm, doc, args.repeat)
        print(f"{name}, {args.tokens}-token document:")
        for first, second, reused in pairs:
            print(f"  first question {first:.3f} s, second {second:.3f} s ({reused} reused)")
        best1, best2 = min(p[0] for p in pairs), min(p[1] for p in pairs)
        print(f"  best: {best1:.3f} s vs {best2:.3f} s, ratio {best2 / best1:.3f}x")


if __name__ == "__main__":
    main()
