"""cffi declarations of the part of llama.h that llama-sparsek uses, and the module build.

Out-of-line API mode: the extension is compiled against the vendored `llama.h`, so
- structs end in `...;`: cffi takes their layout from the real header (a field that moved or
  changed type is a compile error, not silent memory corruption);
- every function declared here gets a `_Static_assert` that its type equals the header's, so a
  re-pin that changes a signature fails the build.

CMake runs `python _ffi_build.py OUT.c` and compiles OUT.c against libllama.
"""

from __future__ import annotations

import re
import sys

from cffi import FFI

TYPES = r"""
typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;

struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_sampler;
typedef struct llama_memory_i * llama_memory_t;

enum ggml_log_level { GGML_LOG_LEVEL_NONE, GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_INFO,
                      GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT, ... };
enum ggml_type { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
                 GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_BF16, GGML_TYPE_I32, ... };
enum llama_flash_attn_type { LLAMA_FLASH_ATTN_TYPE_AUTO, LLAMA_FLASH_ATTN_TYPE_DISABLED,
                             LLAMA_FLASH_ATTN_TYPE_ENABLED, ... };
enum llama_sparsek_mode { LLAMA_SPARSEK_MODE_AUTO, LLAMA_SPARSEK_MODE_DISABLED,
                          LLAMA_SPARSEK_MODE_ENABLED, ... };
enum llama_model_kv_override_type { LLAMA_KV_OVERRIDE_TYPE_INT, LLAMA_KV_OVERRIDE_TYPE_FLOAT,
                                    LLAMA_KV_OVERRIDE_TYPE_BOOL, LLAMA_KV_OVERRIDE_TYPE_STR, ... };

struct ggml_tensor {
    enum ggml_type type;
    int64_t ne[4];
    size_t  nb[4];
    char    name[...];
    ...;
};

typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);

struct llama_model_kv_override {
    enum llama_model_kv_override_type tag;
    char key[128];
    union {
        int64_t val_i64;
        double  val_f64;
        bool    val_bool;
        char    val_str[128];
    };
    ...;
};

struct llama_model_params {
    int32_t n_gpu_layers;
    const struct llama_model_kv_override * kv_overrides;
    bool vocab_only;
    ...;
};

struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    int32_t  n_threads;
    int32_t  n_threads_batch;
    enum llama_flash_attn_type flash_attn_type;
    ggml_backend_sched_eval_callback cb_eval;
    void * cb_eval_user_data;
    enum ggml_type type_k;
    enum ggml_type type_v;
    bool no_perf;
    enum llama_sparsek_mode sparsek_mode;
    int32_t sparsek_top_k;
    int32_t sparsek_window;
    int32_t sparsek_stride;
    int32_t sparsek_block_size;
    int32_t sparsek_sinks;
    int32_t sparsek_dense_layers;
    int32_t sparsek_summaries;
    int32_t sparsek_grow_top_k;
    int32_t sparsek_per_group;
    ...;
};

struct llama_sparsek_params {
    bool    enabled;
    int32_t top_k;
    int32_t window;
    int32_t stride;
    int32_t block_size;
    int32_t sinks;
    int32_t dense_layers;
    int32_t summaries;
    int32_t grow_top_k;
    int32_t per_group;
    ...;
};

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token  *  token;
    float        *  embd;
    llama_pos    *  pos;
    int32_t      *  n_seq_id;
    llama_seq_id ** seq_id;
    int8_t       *  logits;
    ...;
} llama_batch;

typedef struct llama_sampler_chain_params {
    bool no_perf;
    ...;
} llama_sampler_chain_params;

typedef struct llama_chat_message {
    const char * role;
    const char * content;
    ...;
} llama_chat_message;
"""

# One declaration per statement: each also gets a compile-time signature check.
FUNCTIONS = r"""
const char * llama_sparsek_version(void);
struct llama_sparsek_params llama_get_sparsek(const struct llama_context * ctx);
const char * llama_print_system_info(void);
void llama_backend_init(void);
void llama_log_set(ggml_log_callback log_callback, void * user_data);
struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_sampler_chain_params llama_sampler_chain_default_params(void);
struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
void llama_free(struct llama_context * ctx);
const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
int32_t llama_model_n_embd(const struct llama_model * model);
int32_t llama_model_n_layer(const struct llama_model * model);
int32_t llama_model_n_head(const struct llama_model * model);
int32_t llama_model_n_head_kv(const struct llama_model * model);
int32_t llama_model_n_swa(const struct llama_model * model);
const char * llama_model_chat_template(const struct llama_model * model, const char * name);
int32_t llama_chat_apply_template(const char * tmpl, const struct llama_chat_message * chat, size_t n_msg, bool add_ass, char * buf, int32_t length);
int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf, int32_t length, int32_t lstrip, bool special);
int32_t llama_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens, char * text, int32_t text_len_max, bool remove_special, bool unparse_special);
uint32_t llama_n_ctx(const struct llama_context * ctx);
uint32_t llama_n_ubatch(const struct llama_context * ctx);
llama_memory_t llama_get_memory(const struct llama_context * ctx);
void llama_memory_clear(llama_memory_t mem, bool data);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
size_t llama_state_seq_get_size(struct llama_context * ctx, llama_seq_id seq_id);
size_t llama_state_seq_get_data(struct llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id);
size_t llama_state_seq_set_data(struct llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id);
struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(struct llama_batch batch);
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
struct llama_sampler * llama_sampler_chain_init(struct llama_sampler_chain_params params);
void llama_sampler_chain_add(struct llama_sampler * chain, struct llama_sampler * smpl);
struct llama_sampler * llama_sampler_init_greedy(void);
struct llama_sampler * llama_sampler_init_dist(uint32_t seed);
struct llama_sampler * llama_sampler_init_top_k(int32_t k);
struct llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_temp(float t);
struct llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n, float penalty_repeat, float penalty_freq, float penalty_present);
llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);
void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
void llama_sampler_free(struct llama_sampler * smpl);
void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
size_t ggml_nbytes(const struct ggml_tensor * tensor);
const char * ggml_type_name(enum ggml_type type);
"""

CALLBACKS = r"""
extern "Python" void _llama_sparsek_log(enum ggml_log_level, const char *, void *);
extern "Python" bool _llama_sparsek_eval(struct ggml_tensor *, bool, void *);
"""

_DECL = re.compile(r"^(?P<ret>.*?)\b(?P<name>\w+)\((?P<args>.*)\);$")


def function_names() -> list[str]:
    """Names of the declared functions, in declaration order."""
    return [m["name"] for line in FUNCTIONS.strip().splitlines() if (m := _DECL.match(line))]


def signature_checks() -> str:
    """C that fails to compile when a declared function's type differs from the header's."""
    out = []
    for line in FUNCTIONS.strip().splitlines():
        m = _DECL.match(line)
        if m is None:
            raise ValueError(f"not a one-line function declaration: {line!r}")
        name = m["name"]
        out.append(f"{m['ret']}_llama_sparsek_decl_{name}({m['args']});")
        out.append(
            f"_Static_assert(__builtin_types_compatible_p(__typeof__({name}), "
            f'__typeof__(_llama_sparsek_decl_{name})), "{name}: declaration differs from llama.h");'
        )
    return "\n".join(out)


SOURCE = '#include "llama.h"\n#include "ggml-backend.h"\n\n' + signature_checks() + "\n"

ffibuilder = FFI()
ffibuilder.cdef(TYPES + FUNCTIONS + CALLBACKS)
ffibuilder.set_source("llama_sparsek._llama_cffi", SOURCE)

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: _ffi_build.py OUTPUT.c")
    ffibuilder.emit_c_code(sys.argv[1])
