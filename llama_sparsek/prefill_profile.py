"""Where a llama.cpp prefill spends its time: `perf record` samples mapped to categories.

Each sample's call stack (DWARF-unwound, so that a release build without frame pointers can be
profiled) is put in one category:

- samples outside the decode (model load, tokenization, printing) are left out: a sample counts
  only when its stack holds `llama_decode` or a ggml compute thread;
- `attention`: anything under a FLASH_ATTN_EXT kernel (its vector helpers included);
- `SparseK selection`: the mask ops (top_k, pool_1d, set_rows, fill) and float (f32/f16) mat
  muls, which these models' quantized weights never use: the block scoring. set_rows also stores
  the KV cache, so dense rows show its (small) share too;
- `mat mul <type>`: a weight mat mul, named by the weight type its innermost kernel handles
  (`ggml_vec_dot_q4_1_q8_1`, the repacked `ggml_gemm_q4_0_8x8_q8_0`, llamafile's
  `tinyBLAS_Q0_AVX<block_q8_0, ...>`, AMX's `ggml_amx_mul_mat_bf16_blocks<block_q4_1>`);
  `mat mul (activations)` the quantization (or BF16 rounding) of the activations that feed them,
  `mat mul (other)` the rest of the op;
- `barrier waits`: threads waiting for each other between ops (OpenMP's barrier, where the
  innermost user-space frame is in libgomp), which grows when the machine is overloaded;
- `rest`: everything else in the decode (norms, rope, adds, copies, graph building).

Sampling a CPU clock at a few hundred Hz costs a few percent; the profiled run's own time to
first token is reported next to the shares, so the distortion is visible.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ATTENTION = "attention"
SELECTION = "SparseK selection"
ACTIVATIONS = "mat mul (activations)"
MATMUL_OTHER = "mat mul (other)"
WAIT = "barrier waits"
REST = "rest"
MATMUL_PREFIX = "mat mul "

FREQUENCY_HZ = 250
STACK_BYTES = 8192  # of each thread's stack copied per sample, for the unwinder

_KERNEL = "([kernel.kallsyms])"
_WAIT = re.compile(r"\(libgomp\.so[^)]*\)$|\bGOMP_barrier\b|\bggml_barrier\b")
_IN_DECODE = re.compile(r"\bllama_decode\b|ggml_graph_compute")
_ATTENTION = re.compile(r"flash_attn")
# the ops of SparseK's selection; the cast of K to BF16 for its scores (patch 0037) is the only copy
# to BF16 in a model's graph
_SELECTION_OPS = re.compile(
    r"ggml_compute_forward_(top_k|pool_1d|set_rows|fill)"
    r"|ggml_compute_forward_dup\w*<[^<>]+, ggml_bf16_t>"
)
# innermost kernels that name the type of src0 (the weight)
_TYPED_KERNELS = (
    # the AMX kernels name the activation's block first, then the weight's
    re.compile(r"tinygemm_kernel_\w+<block_q8_[01K], block_([a-z0-9]+_[0-9A-Za-z]+?)[,> ]"),
    re.compile(r"ggml_vec_dot_([a-z0-9]+_[0-9A-Za-z]+?)_q8_[01K]\b"),
    re.compile(r"ggml_(?:gemm|gemv)_([a-z0-9]+_[0-9A-Za-z]+?)_\d+x\d+"),
    re.compile(r"\bblock_([a-z0-9]+_[0-9A-Za-z]+?)(?:x\d+)?[,> ]"),
)
_FLOAT_KERNELS = re.compile(r"ggml_vec_dot_(f32|f16|bf16)\b|tinyBLAS<|tinyAMX_bf16\b")
# the AMX path of many rows rounds the activations to BF16 in ggml_amx_mul_mat_bf16 itself, and
# runs its products in ggml_amx_mul_mat_bf16_blocks<block_...>, a typed kernel
_ACTIVATIONS = re.compile(
    r"quantize_row_q8|quantize_mat_q8|ggml_quantize_mat|ggml_amx_mul_mat_bf16\b(?!_)"
)
_MATMUL = re.compile(r"mul_mat|llamafile_sgemm")


class ProfileError(RuntimeError):
    """perf is missing or cannot sample here; the message says what to do."""


def categorize(stack: Sequence[str]) -> str | None:
    """The category of one sample (symbols, innermost first); None when it is not in a decode."""
    if not any(_IN_DECODE.search(f) for f in stack):
        return None
    user = [f for f in stack if not f.endswith(_KERNEL)]
    if user and _WAIT.search(user[0]):
        return WAIT
    if any(_ATTENTION.search(f) for f in stack):
        return ATTENTION
    if any(_SELECTION_OPS.search(f) for f in stack):
        return SELECTION
    for frame in stack:
        for pattern in _TYPED_KERNELS:
            found = pattern.search(frame)
            if found:
                return MATMUL_PREFIX + found.group(1)
        if _FLOAT_KERNELS.search(frame):
            return SELECTION
    if any(_ACTIVATIONS.search(f) for f in stack):
        return ACTIVATIONS
    if any(_MATMUL.search(f) for f in stack):
        return MATMUL_OTHER
    return REST


_FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*?)(?:\+0x[0-9a-f]+)?(?:\s+\(([^()]*)\))?\s*$")


def parse_stacks(script: Iterable[str]) -> Iterator[list[str]]:
    """The call stacks in `perf script` output (a header line per sample, then one indented
    `address symbol+offset (dso)` line per frame, innermost first, then a blank line).
    A frame is `symbol (dso file name)`, or the symbol alone when perf printed no dso."""
    stack: list[str] = []
    in_sample = False
    for line in script:
        if not line.strip():
            if in_sample:
                yield stack
            stack, in_sample = [], False
        elif line[0].isspace():
            found = _FRAME.match(line)
            if found:
                symbol, dso = found.groups()
                stack.append(f"{symbol} ({Path(dso).name or dso})" if dso else symbol)
        else:
            if in_sample:
                yield stack
            stack, in_sample = [], True
    if in_sample:
        yield stack


@dataclass(frozen=True)
class Profile:
    counts: dict[str, int]  # decode samples per category
    samples: int  # all samples, decode or not

    @property
    def decode_samples(self) -> int:
        return sum(self.counts.values())

    def share(self, category: str) -> float:
        return self.counts.get(category, 0) / max(1, self.decode_samples)

    @property
    def matmul_share(self) -> float:
        return sum(self.share(c) for c in self.counts if c.startswith("mat mul"))


def summarize(stacks: Iterable[Sequence[str]]) -> Profile:
    counts: Counter[str] = Counter()
    total = 0
    for stack in stacks:
        total += 1
        category = categorize(stack)
        if category is not None:
            counts[category] += 1
    return Profile(dict(counts), total)


def check_perf() -> str:
    """The perf executable, if it can sample a process here."""
    perf = shutil.which("perf")
    if perf is None:
        raise ProfileError("--profile needs `perf` (Debian: apt-get install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="perf-check-") as tmp:
        cmd = [perf, "record", "-q", "-F", str(FREQUENCY_HZ), "-o", f"{tmp}/data", "--", "true"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProfileError(
            "perf cannot sample here (kernel.perf_event_paranoid, container limits?):\n"
            + proc.stderr.strip()
        )
    return perf


def unstripped_builds(roots: Iterable[Path]) -> list[Path]:
    """The libraries and tools of scikit-build trees under `roots` (`build/<tag>/bin`).

    An installed wheel's libraries are stripped: perf would see only their exported symbols, and
    the static kernels behind them would land in `[unknown]`. The build tree keeps the same
    binaries unstripped, with the same build ids, so perf can symbolize through them."""
    found: list[Path] = []
    for root in roots:
        for path in sorted(root.glob("build/*/bin/*")):
            if path.is_file() and (path.name.startswith("lib") or path.name.startswith("llama-")):
                found.append(path)
    return found


def symbols_warning(symbols: Sequence[Path]) -> str | None:
    """What a profile without unstripped builds (`unstripped_builds` found none) would miss."""
    if symbols:
        return None
    return (
        "no unstripped build tree (build/<tag>/bin) in the source checkout or the working "
        "directory: perf sees only the exported symbols of the installed libraries, and most "
        "kernels land in the wrong category - run --profile from the source checkout"
    )


def record(perf: str, cmd: Sequence[str], symbols: Sequence[Path] = ()) -> tuple[Profile, str]:
    """Run `cmd` under `perf record`; its profile and its own combined output. `symbols`:
    unstripped copies of the binaries it runs (matched by build id)."""
    with tempfile.TemporaryDirectory(prefix="prefill-profile-") as tmp:
        data = Path(tmp) / "perf.data"
        ids = [perf, "--buildid-dir", str(Path(tmp) / "buildids")]  # not the user's ~/.debug
        rec = [*ids, "record", "-q", "-N", "-F", str(FREQUENCY_HZ), "--call-graph"]
        rec += [f"dwarf,{STACK_BYTES}", "-o", str(data), "--", *cmd]
        # the program prints the prompt, whose last token may end inside a UTF-8 sequence
        proc = subprocess.run(
            rec, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace"
        )
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise ProfileError(f"perf record of {Path(cmd[0]).name} failed:\n{output[-2000:]}")
        for path in symbols:
            subprocess.run([*ids, "buildid-cache", "-a", str(path)], capture_output=True)
        script = [*ids, "script", "-i", str(data), "-F", "comm,tid,ip,sym", "--no-inline"]
        with subprocess.Popen(
            script, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace"
        ) as p:
            assert p.stdout is not None
            profile = summarize(parse_stacks(p.stdout))
        if p.returncode != 0:
            raise ProfileError(f"perf script failed on {data}")
    return profile, output
