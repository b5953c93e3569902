"""The time-to-first-token benchmark's logic on hand-made inputs: no model runs, no timing."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_sparsek import peer_openvino, prefill_bench, upstream_build
from llama_sparsek.cli import app
from llama_sparsek.prefill_bench import (
    BenchConfig,
    BenchError,
    LlamaCppEngine,
    Prompt,
    Report,
    Result,
    context_size,
    fit_prompt,
    measure,
    parse_completion,
    parse_engines,
    parse_tokens,
    profile_table,
    rotated,
    table,
)
from llama_sparsek.prefill_profile import (
    ACTIVATIONS,
    ATTENTION,
    MATMUL_OTHER,
    REST,
    SELECTION,
    WAIT,
    Profile,
    categorize,
    parse_stacks,
    summarize,
    symbols_warning,
    unstripped_builds,
)

# --------------------------------------------------------------------------- tool output


def completion_output(ids: Sequence[int], ms: float, timed: int | None = None) -> str:
    """What llama-completion --verbose-prompt prints, trimmed to the lines that matter."""
    lines = [
        "main: prompt: 'x'",
        f"main: number of tokens in prompt = {len(ids)}",
    ]
    pieces = {198: "\n", 11: ","}
    lines += [f"{i:6d} -> '{pieces.get(i, 'w')}'" for i in ids]
    lines += [
        "llama_perf_context_print:        load time =      80.12 ms",
        f"llama_perf_context_print: prompt eval time = {ms:10.2f} ms / {timed or len(ids):5d} "
        "tokens (    3.90 ms per token,   256.41 tokens per second)",
        "llama_perf_context_print:        eval time =       0.00 ms /     1 runs",
    ]
    return "\n".join(lines)


def test_parse_completion_reads_the_prompt_eval_time() -> None:
    ids = [504, 198, 11, 198, 7]  # newline pieces split their lines
    assert parse_completion(completion_output(ids, 1234.5), ids) == pytest.approx(1.2345)


def test_parse_completion_reads_time_stamped_logs() -> None:
    ids = [504, 198, 11]
    out = "\n".join(
        f"0.16.131.{i:03d} I {line}"
        for i, line in enumerate(completion_output(ids, 5.0).splitlines())
    )
    assert parse_completion(out, ids) == pytest.approx(0.005)


def test_parse_completion_rejects_other_token_ids() -> None:
    out = completion_output([1, 2, 3], 10.0)
    with pytest.raises(BenchError, match="first difference at position 1"):
        parse_completion(out, [1, 5, 3])
    with pytest.raises(BenchError, match="evaluated 3 token ids, the prompt has 4"):
        parse_completion(out, [1, 2, 3, 4])


def test_parse_completion_needs_the_timing_of_the_whole_prompt() -> None:
    with pytest.raises(BenchError, match="no 'prompt eval time'"):
        parse_completion("     1 -> 'a'\n", [1])
    with pytest.raises(BenchError, match="timed 2 prompt tokens"):
        parse_completion(completion_output([1, 2, 3], 10.0, timed=2), [1, 2, 3])


# --------------------------------------------------------------------------- the prompt


class WordTokenizer:
    """Greedy longest match over a tiny vocabulary, BOS first: cuts do not always round-trip
    ("ab" is one token, "a" + "b" two)."""

    vocab = ("<s>", "a", "b", "ab", " ", "\n")

    def tokenize(self, text: str) -> list[int]:
        ids, i = [0], 0
        while i < len(text):
            for size in (2, 1):
                piece = text[i : i + size]
                if piece in self.vocab:
                    ids.append(self.vocab.index(piece))
                    i += size
                    break
            else:
                raise AssertionError(f"untokenizable {text[i]!r}")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i != 0)


def test_fit_prompt_round_trips_to_exactly_n_tokens() -> None:
    tok = WordTokenizer()
    text = "ab a b\nab ab\n\na b ab ba ab " * 3
    ids = tok.tokenize(text)[1:]
    fitted = 0
    for n in range(2, len(ids)):
        # the reference: every cut of the text, tried by brute force
        fits = any(
            len(tok.tokenize(tok.detokenize(ids[:cut]).rstrip("\n"))) == n
            for cut in range(len(ids) + 1)
        )
        if not fits:
            with pytest.raises(BenchError, match=f"exactly {n} tokens"):
                fit_prompt(ids, n, tok.detokenize, tok.tokenize)
            continue
        prompt = fit_prompt(ids, n, tok.detokenize, tok.tokenize)
        assert len(prompt.tokens) == n
        assert list(prompt.tokens) == tok.tokenize(prompt.text)
        assert text.startswith(prompt.text)
        assert not prompt.text.endswith("\n")
        fitted += 1
    assert fitted > len(ids) // 2


def test_fit_prompt_refuses_what_it_cannot_fit() -> None:
    tok = WordTokenizer()
    ids = tok.tokenize("ab a")[1:]
    with pytest.raises(BenchError, match="too few for a 10-token prompt"):
        fit_prompt(ids, 10, tok.detokenize, tok.tokenize)
    # BOS + "ab a b" is 6 tokens, the newline is dropped, "ab a b\na" is 8
    ids = tok.tokenize("ab a b\nab ab")[1:]
    with pytest.raises(BenchError, match="exactly 7 tokens"):
        fit_prompt(ids, 7, tok.detokenize, tok.tokenize)


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(("n", "ctx"), [(16, 256), (252, 256), (253, 512), (7680, 7936)])
def test_context_size_holds_the_prompt(n: int, ctx: int) -> None:
    assert context_size(n) == ctx
    assert context_size(n) - 4 >= n


def test_completion_command() -> None:
    engine = LlamaCppEngine("sparsek", Path("/x/llama-completion"), ("--override-kv", "k=int:1"))
    cmd = engine.command(Path("m.gguf"), Path("p.txt"), 7680, 2)
    text = " ".join(cmd)
    assert cmd[0] == "/x/llama-completion"
    for part in ("-m m.gguf", "-f p.txt", "-n 1", "-c 7936", "-b 2048", "-ub 512", "-t 2"):
        assert part in text
    assert "-tb 2 -fa on" in text and "--verbose-prompt" in text and "-no-cnv" in text
    assert cmd[-2:] == ["--override-kv", "k=int:1"]


# --------------------------------------------------------------------------- arguments


def test_parse_tokens() -> None:
    assert parse_tokens("2048, 4096,16384") == (2048, 4096, 16384)
    for bad, message in (("8", "too short"), ("1k", "not an integer"), ("64,64", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_tokens(bad)


def test_parse_engines_keeps_the_canonical_order() -> None:
    assert parse_engines("sparsek,upstream") == ("upstream", "sparsek")
    with pytest.raises(ValueError, match="unknown vllm"):
        parse_engines("dense,vllm")
    with pytest.raises(ValueError, match="at least one"):
        parse_engines(" , ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"repetitions": 0}, "repetitions"),
        ({"threads": 0}, "threads"),
        ({"tokens": ()}, "prompt lengths"),
        ({"engines": ("dense", "gpu")}, "unknown gpu"),
    ],
)
def test_bench_config_validates(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**change)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "8"], "too short"),
        (["--engines", "upstream,tgi"], "unknown tgi"),
        (["-r", "0"], "repetitions"),
    ],
)
def test_cli_rejects_bad_arguments_before_running(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output


# --------------------------------------------------------------------------- measuring, tables


def test_measure_interleaves_and_rotates() -> None:
    calls: list[tuple[int, str]] = []

    def timer_for(name: str) -> prefill_bench.Timer:
        def timer(prompt: Prompt, repetition: int) -> float:
            calls.append((repetition, name))
            return float(len(prompt.tokens) + repetition)

        return timer

    names = ["a", "b", "c"]
    prompts = {4: Prompt("x", (1, 2, 3, 4))}
    results = {(4, n): Result(4, n, n) for n in names}
    measure({n: timer_for(n) for n in names}, prompts, 3, results, lambda _: None)
    assert calls == [
        (0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b"),
    ]  # fmt: skip
    assert results[4, "a"].times == [4.0, 5.0, 6.0]
    assert rotated(names, 4) == ["b", "c", "a"]


def test_table_ratios_against_upstream() -> None:
    report = Report(
        "m",
        [
            Result(7680, "upstream", "up", [31.0, 30.0]),
            Result(7680, "sparsek", "sk", [15.5, 15.0]),
            Result(2048, "dense", "d", [4.0]),  # no upstream at this length
        ],
        [],
    )
    lines = table(report).splitlines()
    assert lines[2] == "| 7680 | up | 30.00 | 256.0 | 1.00x | 31.00, 30.00 |"
    assert lines[3] == "| 7680 | sk | 15.00 | 512.0 | 2.00x | 15.50, 15.00 |"
    assert lines[4] == "| 2048 | d | 4.00 | 512.0 | - | 4.00 |"


# --------------------------------------------------------------------------- the profile

COMPUTE = ["ggml_graph_compute_thread", "ggml_graph_compute._omp_fn.0", "gomp_thread_start"]


@pytest.mark.parametrize(
    ("inner", "category"),
    [
        (["ggml_vec_dot_q4_1_q8_1", "ggml_compute_forward_mul_mat_one_chunk"], "mat mul q4_1"),
        (["ggml_vec_dot_q6_K_q8_K", "ggml_compute_forward_mul_mat"], "mat mul q6_K"),
        (["ggml_gemm_q4_0_8x8_q8_0", "ggml_compute_forward"], "mat mul q4_0"),
        (
            ["tinyBLAS_Q0_AVX<block_q8_0, block_q8_0, float>::gemm<4, 2>(long)", "llamafile_sgemm"],
            "mat mul q8_0",
        ),
        (
            [
                "(anonymous namespace)::tinygemm_kernel_amx<block_q8_1, block_q4_1, float, 32, 0>",
                "ggml_backend_amx_mul_mat(ggml_compute_params const*, ggml_tensor*)",
            ],
            "mat mul q4_1",
        ),
        (
            ["(anonymous namespace)::tinygemm_kernel_vnni<block_q8_K, block_q6_K, float, 1>"],
            "mat mul q6_K",
        ),
        (
            [
                "simd_gemm_bf16_ld(float*, long, bool, ggml_bf16_t const*, unsigned int const*, "
                "int, int, int)",
                "void ggml_amx_mul_mat_bf16_blocks<block_q4_1>(ggml_compute_params const*, "
                "ggml_tensor*, ggml_bf16_t const*, int)",
                "ggml_amx_mul_mat_bf16(ggml_compute_params const*, ggml_tensor*)",
                "ggml_backend_amx_mul_mat(ggml_compute_params const*, ggml_tensor*)",
            ],
            "mat mul q4_1",
        ),
        (
            [
                "ggml_amx_mul_mat_bf16(ggml_compute_params const*, ggml_tensor*)",
                "ggml_backend_amx_mul_mat(ggml_compute_params const*, ggml_tensor*)",
            ],
            ACTIVATIONS,
        ),
        (["quantize_row_q8_1", "ggml_compute_forward_mul_mat"], ACTIVATIONS),
        (["ggml_compute_forward_mul_mat"], MATMUL_OTHER),
        # f16 dot products: FLASH_ATTN_EXT's inside it, the SparseK scoring in a mat mul
        (["ggml_vec_dot_f16", "ggml_compute_forward_flash_attn_ext_f16_one_chunk"], ATTENTION),
        (
            ["ggml_flash_attn_ext_gemm_bf16", "ggml_compute_forward_flash_attn_ext_sparse"],
            ATTENTION,
        ),
        (["ggml_vec_dot_f16", "ggml_compute_forward_mul_mat"], SELECTION),
        (
            ["tinyBLAS<16, float __vector(16), float, float, float>::gemm", "llamafile_sgemm"],
            SELECTION,
        ),
        (["(anonymous namespace)::tinyAMX_bf16::matmul(long, long)", "llamafile_sgemm"], SELECTION),
        (["ggml_compute_forward_dup_flt<unsigned short, ggml_bf16_t>"], SELECTION),
        (["ggml_compute_forward_dup_flt<float, float>"], REST),
        (["std::__introselect<int*>", "ggml_compute_forward_top_k_f32"], SELECTION),
        (["ggml_compute_forward_pool_1d"], SELECTION),
        (["ggml_compute_forward_set_rows_f16"], SELECTION),
        (["ggml_compute_forward_fill"], SELECTION),
        (["ggml_barrier"], WAIT),
        (["[unknown] (libgomp.so.1.0.0)", "ggml_compute_forward_mul_mat"], WAIT),
        (["schedule ([kernel.kallsyms])", "GOMP_barrier (libgomp.so.1)"], WAIT),
        (["ggml_compute_forward_rms_norm_f32"], REST),
    ],
)
def test_categorize(inner: list[str], category: str) -> None:
    assert categorize([*inner, *COMPUTE]) == category


def test_profile_without_unstripped_builds_says_so(tmp_path: Path) -> None:
    # a working directory without a build tree: the warning; with one, none
    assert unstripped_builds([tmp_path]) == []
    assert "run --profile from the source checkout" in (symbols_warning([]) or "")
    lib = tmp_path / "build" / "cp311-cp311-linux_x86_64" / "bin" / "libggml-cpu.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    found = unstripped_builds([tmp_path])
    assert found == [lib]
    assert symbols_warning(found) is None


def test_categorize_leaves_out_what_is_not_decoding() -> None:
    assert categorize(["llama_model_load", "main"]) is None
    assert categorize(["[unknown] (libgomp.so.1)", "[unknown] (libgomp.so.1)"]) is None
    assert categorize(["llm_graph_context::build_attn", "llama_decode", "main"]) == REST


PERF_SCRIPT = """\
llama-completion  1234
\t    7f00aa ggml_vec_dot_q4_1_q8_1+0x1a (/b/libggml-cpu.so)
\t    7f00bb ggml_compute_forward_mul_mat+0x2f0 (/b/libggml-cpu.so)
\t    7f00cc ggml_graph_compute_thread+0x88 (/b/libggml-cpu.so)

llama-completion  1235
\t    7f00dd void ggml::cpu::repack::gemm<block_q4_0, 8l, 8l>(int, float*)+0x10 (/b/libggml-cpu.so)
\t    7f00ee [unknown] (/b/libggml-cpu.so)
\t    7f00ff ggml_graph_compute_thread+0x88 (/b/libggml-cpu.so)

llama-completion  1234
\t    ffffffff81000 clear_page_rep+0x7 ([kernel.kallsyms])
\t    7f0011 llama_model_load+0x10 (/b/libllama.so)

llama-completion  1235
\t    7f0022 [unknown] (/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0)
\t    7f0033 ggml_graph_compute_thread
"""


def test_parse_stacks_and_summarize() -> None:
    stacks = list(parse_stacks(PERF_SCRIPT.splitlines()))
    assert stacks[0] == [
        "ggml_vec_dot_q4_1_q8_1 (libggml-cpu.so)",
        "ggml_compute_forward_mul_mat (libggml-cpu.so)",
        "ggml_graph_compute_thread (libggml-cpu.so)",
    ]
    gemm = "void ggml::cpu::repack::gemm<block_q4_0, 8l, 8l>(int, float*)"
    assert stacks[1][0] == f"{gemm} (libggml-cpu.so)"
    assert stacks[1][1] == "[unknown] (libggml-cpu.so)"
    assert stacks[2] == ["clear_page_rep ([kernel.kallsyms])", "llama_model_load (libllama.so)"]
    assert stacks[3] == ["[unknown] (libgomp.so.1.0.0)", "ggml_graph_compute_thread"]
    profile = summarize(stacks)
    assert profile.counts == {"mat mul q4_1": 1, "mat mul q4_0": 1, WAIT: 1}
    assert (profile.samples, profile.decode_samples) == (4, 3)
    assert profile.matmul_share == pytest.approx(2 / 3)


def test_profile_table() -> None:
    counts = {"mat mul q8_0": 10, "mat mul q4_1": 50, ATTENTION: 30, SELECTION: 5, REST: 5}
    result = Result(7680, "sparsek", "sk", [1.0], Profile(counts, 120), 1.05)
    lines = profile_table(Report("m", [result, Result(7680, "dense", "d", [2.0])], [])).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:6] == [
        "tokens",
        "engine",
        "profiled TTFT s",
        "weight mat muls",
        "mat mul q4_1",
        "mat mul q8_0",
    ]
    assert head[-5:] == [ATTENTION, SELECTION, WAIT, REST, "samples"]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["7680", "sk", "1.05", "60.0%", "50.0%", "10.0%"]
    assert cells[-5:] == ["30.0%", "5.0%", "0.0%", "5.0%", "100/120"]
    assert len(lines) == 3  # the unprofiled row is left out


# --------------------------------------------------------------------------- builds and peer


def test_cmake_flags_mirror_the_recorded_ggml_flags() -> None:
    info = {"cmake_args": {"GGML_NATIVE": "ON", "GGML_CUDA": "OFF", "GGML_CCACHE": "ON"}}
    flags = upstream_build.cmake_flags(info, "/usr/bin/ccache")
    assert "-DGGML_NATIVE=ON" in flags and "-DGGML_CUDA=OFF" in flags
    assert "-DGGML_CCACHE=OFF" in flags and "-DGGML_CCACHE=ON" not in flags
    assert "-DCMAKE_BUILD_TYPE=Release" in flags and "-DBUILD_SHARED_LIBS=ON" in flags
    assert "-DCMAKE_CXX_COMPILER_LAUNCHER=/usr/bin/ccache" in flags
    assert not any("LAUNCHER" in f for f in upstream_build.cmake_flags(info, None))


def _git(tree: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
    out = subprocess.run(["git", *args], cwd=tree, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("subject", ["upstream llama.cpp " + "0c1e5709" * 5, "something else"])
def test_pinned_commit_from_the_tag(tmp_path: Path, subject: str) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("x")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "commit", "-q", "-m", subject)
    _git(tmp_path, "tag", "upstream")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "a patch")
    expected = (
        subject.split()[-1]
        if subject.startswith("upstream")
        else _git(tmp_path, "rev-parse", "upstream")
    )
    assert re.fullmatch("[0-9a-f]{40}", expected)
    assert upstream_build.pinned_commit(tmp_path) == expected


def test_export_carries_only_the_crash_fixes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _git(tree, "init", "-q")
    (tree / "amx.cpp").write_text("config on the stack\n")
    (tree / "ops.cpp").write_text("upstream kernel\n")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "-m", "upstream llama.cpp " + "0c1e5709" * 5)
    _git(tree, "tag", "upstream")
    (tree / "ops.cpp").write_text("our kernel\n")
    _git(tree, "commit", "-qam", "ggml-cpu : a patch of ours")
    (tree / "amx.cpp").write_text("config in static storage\n")
    [fix] = upstream_build.CRASH_FIXES
    _git(tree, "commit", "-qam", fix)
    (tree / "ops.cpp").write_text("our later kernel\n")
    _git(tree, "commit", "-qam", "ggml-cpu : a later patch of ours")

    fixes = upstream_build.crash_fixes(tree)
    assert list(fixes) == [fix]
    assert upstream_build.describe(tree) == "pristine + " + upstream_build.CRASH_FIXES[fix]
    dest = tmp_path / "src"
    upstream_build._export(tree, dest, fixes)
    assert (dest / "amx.cpp").read_text() == "config in static storage\n"
    assert (dest / "ops.cpp").read_text() == "upstream kernel\n"  # none of our patches
    assert not list(tmp_path.glob(".src-*"))  # no staging left behind

    _git(tree, "reset", "-q", "--hard", "upstream")
    assert upstream_build.crash_fixes(tree) == {}
    assert upstream_build.describe(tree) == "pristine"


def test_peer_type_check(tiny_model: Path) -> None:
    assert peer_openvino.unsupported_types(tiny_model) == []  # all f32
    assert "q5_0" not in peer_openvino.SUPPORTED_TYPES
