"""SparseK settings: the GGUF keys they map to, their validation and the recommended defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# Suffixes of the arch-prefixed GGUF keys read by the patched llama.cpp
# (`<arch>.sparsek.<suffix>`, e.g. `llama.sparsek.top_k`).
KEY_ENABLE = "enable"
KEY_TOP_K = "top_k"
KEY_WINDOW = "window"
KEY_STRIDE = "stride"
KEY_BLOCK_SIZE = "block_size"
KEY_SINKS = "sinks"
KEY_DENSE_LAYERS = "dense_layers"
KEY_SUMMARIES = "summaries"
KEY_GROW_TOP_K = "grow_top_k"
KEY_PER_GROUP = "per_group"
KEY_SUFFIXES = (
    KEY_ENABLE,
    KEY_TOP_K,
    KEY_WINDOW,
    KEY_STRIDE,
    KEY_BLOCK_SIZE,
    KEY_SINKS,
    KEY_DENSE_LAYERS,
    KEY_SUMMARIES,
    KEY_GROW_TOP_K,
    KEY_PER_GROUP,
)
# the largest value the patched llama.cpp accepts (INT32_MAX/4: sums of them stay in int32)
MAX_VALUE = (2**31 - 1) // 4


def sparsek_key(arch: str, suffix: str) -> str:
    """The full GGUF key for one SparseK setting of an architecture."""
    if suffix not in KEY_SUFFIXES:
        raise ValueError(f"unknown SparseK key suffix {suffix!r}; expected one of {KEY_SUFFIXES}")
    return f"{arch}.sparsek.{suffix}"


def is_sparsek_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and parts[1] == "sparsek"


def value_type(key: str) -> type[bool] | type[int]:
    """The type of a SparseK key's value (a suffix or a full key): `enable` is a flag, the sizes
    are counts. The one rule behind the GGUF types (BOOL, UINT32: `gguf.sparsek_type`) and the
    kv_overrides types (bool, int: `check_override`)."""
    suffix = key.rsplit(".", 1)[-1]
    if suffix not in KEY_SUFFIXES:
        raise ValueError(f"unknown SparseK key {key!r}; the suffix must be one of {KEY_SUFFIXES}")
    return bool if suffix == KEY_ENABLE else int


def check_override(key: str, value: object) -> None:
    """Raise ValueError for a kv_override of a SparseK key whose value llama.cpp would not take
    (it ignores an override of the wrong type with a warning and reads the file's value)."""
    if not is_sparsek_key(key):
        return
    kind = value_type(key)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(
            f"kv_overrides[{key!r}] must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )


@dataclass(frozen=True)
class SparseK:
    """SparseK attention settings.

    Each query keeps every key of the local ``window`` (the last ``window`` positions up to and
    including the query), when ``stride`` > 0 every key whose position is a multiple of
    ``stride``, the keys of the first ``sinks`` positions of its sequence, and ``top_k`` more
    keys its causal mask allows: with ``block_size`` 1 the ``top_k`` best-scoring keys, else the
    ``top_k // block_size`` blocks of ``block_size`` consecutive KV cells whose best key scores
    best. With no window, stride or sinks, a query keeps its first key in their place. A query
    that would keep 20% of the keys it sees or more keeps them all, and the first
    ``dense_layers`` layers keep every key.

    ``summaries`` 1 scores a block by the upper bound of its keys' scores from the per-channel
    max and min of its keys (as in Quest), which llama.cpp keeps next to the KV cache and writes
    with the keys: a query reads ``n_kv / block_size`` summaries instead of every key, which
    makes the selection cheaper and less exact (README, "Block summaries"). 0 scores every key.

    ``grow_top_k`` 1 lets ``top_k`` grow with the keys a query sees: past the ``n0`` keys where
    SparseK starts dropping keys, a query that sees ``n`` keeps ``top_k * sqrt(n / n0)`` of them
    (rounded down to whole blocks; `evaluation.top_k_at`), so that a longer context keeps more
    of its far keys at a cost that still grows slower than the keys. 0 keeps ``top_k`` at every
    length.

    ``per_group`` 1 lets each group of query heads that shares a K head select its own keys, by
    the scores of its own heads (a mask per K head, which flash attention broadcasts over the
    heads of the group); 0 selects one set of keys for all heads by their summed scores. It
    applies with one KV stream and no ALiBi or attention sinks (elsewhere the selection stays
    shared), not with ``summaries``; measured slower and no better (README, "Selection per K
    head"), so it is off.
    """

    top_k: int = 1536
    window: int = 256
    stride: int = 0
    block_size: int = 8
    sinks: int = 0
    dense_layers: int = 1
    summaries: int = 0
    grow_top_k: int = 1
    per_group: int = 0

    def __post_init__(self) -> None:
        for name, value in self.values().items():
            validate_value(name, value)
        validate_block_size(self.top_k, self.window, self.block_size)
        if self.summaries and self.block_size == 1:
            raise ValueError("SparseK summaries summarize blocks: they need block_size > 1")
        if self.summaries and self.per_group:
            raise ValueError("SparseK summaries are scored for all heads at once: not per_group")

    def values(self) -> dict[str, int]:
        """The settings by key suffix (`top_k`, ...): the field names are the suffixes."""
        return asdict(self)

    def grid_item(self) -> str:
        """`top_k:window:block_size[:summaries][:grow][:group]`, an item of the grids of `eval` and
        `eval-tasks` (the switches that are on by name; the other settings take their defaults
        there)."""
        flags = [name for name, on in GRID_FLAGS.items() if getattr(self, on)]
        return ":".join([str(self.top_k), str(self.window), str(self.block_size), *flags])

    def kv_overrides(self, arch: str) -> dict[str, bool | int]:
        """The llama.cpp kv_overrides that enable these settings for a model of `arch`."""
        overrides: dict[str, bool | int] = {sparsek_key(arch, KEY_ENABLE): True}
        for suffix, value in self.values().items():
            overrides[sparsek_key(arch, suffix)] = value
        return overrides


# the switches a grid item turns on by name after top_k:window:block_size (`1536:256:8:grow`)
GRID_FLAGS = {"summaries": KEY_SUMMARIES, "grow": KEY_GROW_TOP_K, "group": KEY_PER_GROUP}
GRID_ITEM = "top_k:window[:block[:summaries][:grow][:group]]"

# the smallest value each setting accepts
_MIN_VALUE = {
    KEY_TOP_K: 1,
    KEY_WINDOW: 0,
    KEY_STRIDE: 0,
    KEY_BLOCK_SIZE: 1,
    KEY_SINKS: 0,
    KEY_DENSE_LAYERS: 0,
    KEY_SUMMARIES: 0,
    KEY_GROW_TOP_K: 0,
    KEY_PER_GROUP: 0,
}
# the largest value of the settings that are switches rather than counts
_MAX_SWITCH = {KEY_SUMMARIES: 1, KEY_GROW_TOP_K: 1, KEY_PER_GROUP: 1}


def validate_value(name: str, value: object) -> None:
    """Raise TypeError unless `value` is an int, ValueError unless it is in range for the SparseK
    setting `name` (a key suffix)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SparseK {name} must be an int, got {type(value).__name__} {value!r}")
    if value > MAX_VALUE:
        raise ValueError(f"SparseK {name} must be <= {MAX_VALUE}, got {value}")
    if value < _MIN_VALUE[name]:
        raise ValueError(f"SparseK {name} must be >= {_MIN_VALUE[name]}, got {value}")
    if value > _MAX_SWITCH.get(name, MAX_VALUE):
        raise ValueError(f"SparseK {name} must be 0 or 1, got {value}")


def validate_block_size(top_k: int, window: int, block_size: int) -> None:
    """Raise ValueError unless top_k is a whole number of blocks and, with blocks, the window
    covers the block that holds the query (a block is selected only if all its keys are allowed,
    so the keys of the query's own, partly future block are kept only by the window)."""
    if top_k % block_size != 0:
        raise ValueError(
            f"SparseK block_size must divide top_k, got top_k {top_k}, block_size {block_size}"
        )
    if block_size > 1 and window < block_size:
        raise ValueError(
            f"SparseK window must be >= block_size with blocks, got window {window}, "
            f"block_size {block_size}"
        )


def recommended(arch: str | None = None) -> SparseK:
    """The project's recommended SparseK settings for a model architecture.

    This is the one place that owns the defaults: `SparseK()` and `gguf set --enable` use it,
    and llama.cpp's `LLAMA_SPARSEK_DEFAULT_*` (patch 0020) must equal it. Chosen by measurements
    on SmolLM2-135M (README, "Quality across corpora"): the rule is the worst corpus, not the
    average - within 2% perplexity of dense attention on every corpus that chooses (prose,
    verse, Python code, reStructuredText docs; 8k context, two windows), confirmed on one kept
    aside (a play), and on every corpus's Pareto front (`llama-sparsek eval-pareto`). A query
    drops keys only where it keeps less than 20% of them (here from 8,961 keys on, the measured
    break-even of the prefill), so short prompts stay dense; past that top_k grows with the
    square root of the keys a query sees (`grow_top_k`): a fixed top_k lost 2.5% perplexity on
    verse at 16k on Qwen2.5-Coder-0.5B and needle retrieval at 32k (README, "A top_k that grows
    with the context").
    """
    del arch  # one setting for every architecture until measurements say otherwise
    return SparseK()


def tool_flags(setting: SparseK | None) -> list[str]:
    """The flags of llama.cpp's tools (llama-completion, -perplexity, -server, -bench) for a
    setting: SparseK off (dense, whatever the model
    file says) for None, else on with exactly these settings."""
    if setting is None:
        return ["--sparsek", "off"]
    flags = ["--sparsek", "on"]
    for suffix, value in setting.values().items():
        flags += ["--sparsek-" + suffix.replace("_", "-"), str(value)]
    return flags


def from_options(
    enabled: bool,
    top_k: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    block_size: int | None = None,
    sinks: int | None = None,
    dense_layers: int | None = None,
    summaries: int | None = None,
    grow_top_k: int | None = None,
    per_group: int | None = None,
) -> SparseK | None:
    """The settings command-line options ask for: the recommended ones with the given values on
    top, or None when SparseK is off (ValueError for values without SparseK, or out of range)."""
    given = {
        "top_k": top_k,
        "window": window,
        "stride": stride,
        "block_size": block_size,
        "sinks": sinks,
        "dense_layers": dense_layers,
        "summaries": summaries,
        "grow_top_k": grow_top_k,
        "per_group": per_group,
    }
    chosen = {k: v for k, v in given.items() if v is not None}
    if not enabled:
        if chosen:
            flags = ", ".join(f"--sparsek-{name.replace('_', '-')}" for name in chosen)
            raise ValueError(f"{flags} need SparseK on (drop --no-sparsek)")
        return None
    return replace(recommended(), **chosen)
