"""`llama-sparsek gguf ...`: show, set and unset GGUF metadata, SparseK keys in particular.

Exit codes: 0 done, 1 an OS error (permissions, disk full), 2 a bad file or a bad edit
(GGUFError, reported in one line, never with a traceback) or bad usage.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from llama_sparsek.gguf import (
    Change,
    EditResult,
    Field,
    GGUFError,
    GGUFInfo,
    GGUFType,
    Update,
    edit_metadata,
    parse_kv_override,
    read_metadata,
    sparsek_removals,
    sparsek_updates,
)
from llama_sparsek.sparsek import KEY_SUFFIXES, is_sparsek_key

app = typer.Typer(
    name="gguf",
    help="Show, set and unset GGUF metadata (SparseK keys: <arch>.sparsek.*).",
    no_args_is_help=True,
    add_completion=False,
)

PREVIEW_ITEMS = 8  # arrays longer than this are shown as their length and first items
PREVIEW_CHARS = 80  # strings longer than this are cut in the text view (not in --json)

FileArg = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, show_default=False, help="A GGUF file.")
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--out",
        help="Write the result to OUT (atomically; FILE is untouched). OUT must be a new or "
        "regular file other than FILE (use --in-place for FILE itself).",
    ),
]
InPlaceOpt = Annotated[
    bool,
    typer.Option(
        "--in-place",
        help="Edit FILE itself: a header patch when a few bytes change, else an atomic rewrite.",
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print what would change and write nothing.")
]


@contextmanager
def _errors() -> Iterator[None]:
    """Turn refusals into one-line messages and exit codes instead of tracebacks."""
    try:
        yield
    except GGUFError as e:
        _echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _echo(f"error: {where}{e.strerror or e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def show(
    file: FileArg,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Machine-readable output (strict JSON: a NaN or infinite float is the string "
            '"nan", "inf" or "-inf").',
        ),
    ] = False,
) -> None:
    """Header facts and every metadata key with its type and value."""
    with _errors():
        info = read_metadata(file)
    if as_json:
        _echo(json.dumps(_info_json(info), indent=2, allow_nan=False))
        return
    for line in _info_lines(info):
        _echo(line)


@app.command("set")
def set_(
    file: FileArg,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Keys each query keeps.")] = None,
    window: Annotated[int | None, typer.Option(help="Local window always kept.")] = None,
    stride: Annotated[int | None, typer.Option(help="Keep every stride-th key (0: off).")] = None,
    block_size: Annotated[
        int | None,
        typer.Option("--block-size", help="Select blocks of this many keys (1: single keys)."),
    ] = None,
    sinks: Annotated[
        int | None, typer.Option(help="The first positions of a sequence, always kept.")
    ] = None,
    dense_layers: Annotated[
        int | None,
        typer.Option("--dense-layers", help="The first layers keep every key (0: none)."),
    ] = None,
    summaries: Annotated[
        int | None,
        typer.Option(
            help="1: score blocks by their per-channel max/min summaries kept with the KV "
            "cache; 0: by their best key."
        ),
    ] = None,
    grow_top_k: Annotated[
        int | None,
        typer.Option(
            "--grow-top-k",
            help="1: top_k grows as the square root of the keys a query sees, past where "
            "SparseK starts; 0: fixed.",
        ),
    ] = None,
    per_group: Annotated[
        int | None,
        typer.Option(
            "--per-group",
            help="1: each group of query heads that shares a K head selects its own keys; "
            "0: one selection for all heads.",
        ),
    ] = None,
    enable: Annotated[
        bool | None,
        typer.Option(
            "--enable/--disable",
            help="Turn SparseK on or off; --enable alone writes the recommended settings.",
        ),
    ] = None,
    kv: Annotated[
        list[str] | None,
        typer.Option(
            "--kv",
            metavar="KEY=TYPE:VALUE",
            help="Set any key, as llama.cpp's --override-kv: TYPE int, float, bool or str "
            "(an existing key keeps its type, a new int/float is INT64/FLOAT64), or an exact "
            "u8..u64, i8..i64, f32, f64. Repeatable.",
        ),
    ] = None,
    out: OutOpt = None,
    in_place: InPlaceOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Write <arch>.sparsek.* keys (arch from general.architecture) and any --kv keys."""
    with _errors():
        info = read_metadata(file)
        updates: dict[str, Update] = {}
        settings = (
            top_k,
            window,
            stride,
            block_size,
            sinks,
            dense_layers,
            summaries,
            grow_top_k,
            per_group,
        )
        if enable is not None or any(v is not None for v in settings):
            updates = sparsek_updates(
                info,
                top_k=top_k,
                window=window,
                stride=stride,
                block_size=block_size,
                sinks=sinks,
                dense_layers=dense_layers,
                summaries=summaries,
                grow_top_k=grow_top_k,
                per_group=per_group,
                enable=enable,
            )
        for spec in kv or ():
            key, update = parse_kv_override(spec, info)
            if key in updates:
                raise GGUFError(f"key {key!r} is given twice")
            updates[key] = update
        if not updates:
            raise GGUFError(
                "nothing to set: give --top-k, --window, --stride, --block-size, --sinks, "
                "--dense-layers, --summaries, --grow-top-k, --enable, --kv"
            )
        result = edit_metadata(info, updates, out=out, in_place=in_place, dry_run=dry_run)
    _report(result)


@app.command()
def unset(
    file: FileArg,
    keys: Annotated[
        list[str] | None,
        typer.Argument(
            show_default=False,
            help=f"Keys to remove (default: every <arch>.sparsek.* key); "
            f"{', '.join(KEY_SUFFIXES)} name the arch's SparseK key.",
        ),
    ] = None,
    out: OutOpt = None,
    in_place: InPlaceOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Remove the SparseK keys, or only the named keys."""
    with _errors():
        info = read_metadata(file)
        result = edit_metadata(
            info,
            remove=sparsek_removals(info, keys or ()),
            out=out,
            in_place=in_place,
            dry_run=dry_run,
        )
    _report(result)


# --- presentation ------------------------------------------------------------------------------


def _echo(text: str, err: bool = False) -> None:
    """Print, showing invalid UTF-8 (decoded as surrogates: keys, names, paths) as U+FFFD."""
    typer.echo(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), err=err)


def _text(value: str) -> str:
    """A string value as one quoted, escaped line, cut when long."""
    if len(value) > PREVIEW_CHARS:
        return f"{json.dumps(value[:PREVIEW_CHARS], ensure_ascii=False)}... ({len(value)} chars)"
    return json.dumps(value, ensure_ascii=False)


def _scalar(value: object, type_: GGUFType) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, float) and type_ is GGUFType.FLOAT32:
        return _shortest_f32(value)
    return repr(value)


def _shortest_f32(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974e-06)."""
    stored = struct.pack("<f", value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("<f", float(text)) == stored:
            return text
    return repr(value)


def _value(kv: Field) -> str:
    if kv.item_type is None:
        return _scalar(kv.value, kv.type)
    head = ", ".join(_scalar(v, kv.item_type) for v in kv.items(PREVIEW_ITEMS))
    if kv.count <= PREVIEW_ITEMS:
        return f"[{head}]"
    return f"{kv.count} items: [{head}, ...]"


def _info_lines(info: GGUFInfo) -> Iterator[str]:
    width = max((len(key) for key in info.fields), default=0)
    types: dict[str, int] = {}
    for t in info.tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    yield f"{info.path}: GGUF v{info.version}, {info.tensor_count} tensors, {info.kv_count} keys"
    yield (
        f"  alignment {info.alignment}, header {info.header_size} bytes, "
        f"data offset {info.data_offset}, file {info.file_size} bytes"
    )
    if types:
        yield "  tensor types: " + ", ".join(f"{name} x{n}" for name, n in types.items())
    yield ""
    for key, kv in info.fields.items():
        line = f"{key:<{width}}  {kv.type_name:<14} {_value(kv)}"
        if is_sparsek_key(key):
            yield typer.style(f"* {line}", fg=typer.colors.GREEN, bold=True)
        else:
            yield f"  {line}"
    yield ""
    yield _sparsek_summary(info)


def _sparsek_summary(info: GGUFInfo) -> str:
    arch = info.arch
    if arch is None:
        return "SparseK: no general.architecture, so no SparseK keys apply"
    prefix = f"{arch}.sparsek."
    found = {k.removeprefix(prefix): kv for k, kv in info.fields.items() if k.startswith(prefix)}
    if not found:
        return f"SparseK: no {prefix}* keys (add them with: gguf set FILE --enable)"
    settings = " ".join(f"{suffix}={_value(kv)}" for suffix, kv in found.items())
    return typer.style(f"SparseK ({arch}): {settings}", fg=typer.colors.GREEN, bold=True)


def _json_scalar(value: object) -> object:
    """JSON has no NaN or infinity: such floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _json_value(kv: Field) -> dict[str, Any]:
    if kv.item_type is None:
        return {"type": kv.type.name, "value": _json_scalar(kv.value)}
    return {
        "type": kv.type.name,
        "item_type": kv.item_type.name,
        "length": kv.count,
        "value": [_json_scalar(v) for v in kv.items(PREVIEW_ITEMS)],
        "truncated": kv.count > PREVIEW_ITEMS,
    }


def _info_json(info: GGUFInfo) -> dict[str, Any]:
    return {
        "path": str(info.path),
        "version": info.version,
        "tensor_count": info.tensor_count,
        "kv_count": info.kv_count,
        "alignment": info.alignment,
        "header_size": info.header_size,
        "data_offset": info.data_offset,
        "file_size": info.file_size,
        "arch": info.arch,
        "metadata": {key: _json_value(kv) for key, kv in info.fields.items()},
        "sparsek": {
            key: _json_value(kv)["value"] for key, kv in info.fields.items() if is_sparsek_key(key)
        },
        "tensors": [
            {
                "name": t.name,
                "type": t.type_name,
                "shape": list(t.shape),
                "offset": t.offset,
                "nbytes": t.nbytes,
            }
            for t in info.tensors
        ],
    }


def _change_line(change: Change) -> str:
    if change.new is None:
        assert change.old is not None
        return f"  - {change.key} (was {_value(change.old)})"
    new = f"{_value(change.new)} ({change.new.type_name})"
    if change.old is None:
        return f"  + {change.key} = {new}"
    return f"  ~ {change.key}: {_value(change.old)} -> {new}"


_WOULD = {"unchanged": "leave {} unchanged", "patch": "patch {} in place", "rewrite": "write {}"}
_DONE = {"unchanged": "{} is unchanged", "patch": "patched {} in place", "rewrite": "wrote {}"}


def _report(result: EditResult) -> None:
    for change in result.changes:
        _echo(_change_line(change))
    if result.dry_run:
        _echo(f"dry run: would {_WOULD[result.method].format(result.path)}; nothing written")
    else:
        _echo(_DONE[result.method].format(result.path))
