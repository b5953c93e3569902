#!/usr/bin/env python3
"""Time to first token of a long prompt of real text: pristine upstream llama.cpp at the pin vs
llama-sparsek dense vs SparseK (vs OpenVINO GenAI when installed). Same as `llama-sparsek bench`:

    python scripts/bench_prefill.py [--model smollm2-135m] [--tokens 7680] [-r 3] [--profile]
"""

from __future__ import annotations

import typer

from llama_sparsek.cli_bench import bench_command

if __name__ == "__main__":
    typer.run(bench_command)
