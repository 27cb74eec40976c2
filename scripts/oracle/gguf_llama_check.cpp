// Independent check that llama.cpp accepts a GGUF written by safeguard-gguf: loads it, tokenizes
// each argument text with llama.cpp's own gpt2/"gpt-4o" BPE, and evaluates a token sequence,
// printing JSON lines for gguf_oracle.py to compare against tiktoken/harmony.
// Build: see gguf_oracle.py (links the static libs that llama-cpp-sys-2 built in target/).
#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf EVAL_IDS(comma-separated) [TEXT...]\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        printf("{\"loaded\": false}\n");
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    printf("{\"loaded\": true, \"n_vocab\": %d, \"bos\": %d, \"eos\": %d, \"n_layer\": %d, \"n_embd\": %d}\n",
           llama_vocab_n_tokens(vocab), llama_vocab_bos(vocab), llama_vocab_eos(vocab),
           llama_model_n_layer(model), llama_model_n_embd(model));

    for (int i = 3; i < argc; i++) {
        const char * text = argv[i];
        std::vector<llama_token> ids(strlen(text) + 16);
        int n = llama_tokenize(vocab, text, (int) strlen(text), ids.data(), (int) ids.size(), false, false);
        printf("{\"text\": %d, \"ids\": [", i - 3);
        for (int j = 0; j < n; j++) printf("%s%d", j ? ", " : "", ids[j]);
        printf("]}\n");
    }
    // token ids -> text pieces (special tokens rendered) for a few ids
    std::vector<llama_token> eval_ids;
    for (char * p = strtok(argv[2], ","); p; p = strtok(nullptr, ",")) eval_ids.push_back(atoi(p));
    printf("{\"eog\": [");
    bool first = true;
    for (int id : {199999, 200002, 200007, 200012}) {
        if (llama_vocab_is_eog(vocab, id)) { printf("%s%d", first ? "" : ", ", id); first = false; }
    }
    printf("]}\n");

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        printf("{\"context\": false}\n");
        return 1;
    }
    llama_batch batch = llama_batch_init((int) eval_ids.size(), 0, 1);
    for (size_t i = 0; i < eval_ids.size(); i++) {
        batch.token[i] = eval_ids[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int) eval_ids.size();
    if (llama_decode(ctx, batch) != 0) {
        printf("{\"decode\": false}\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (size_t i = 0; i < eval_ids.size(); i++) {
        const float * logits = llama_get_logits_ith(ctx, (int) i);
        int finite = 1, argmax = 0;
        double sum = 0, sumsq = 0;
        for (int v = 0; v < n_vocab; v++) {
            if (!std::isfinite(logits[v])) finite = 0;
            if (logits[v] > logits[argmax]) argmax = v;
            sum += logits[v];
            sumsq += (double) logits[v] * logits[v];
        }
        printf("{\"pos\": %zu, \"finite\": %s, \"argmax\": %d, \"mean\": %.6f, \"rms\": %.6f, \"first\": [%.6f, %.6f, %.6f]}\n",
               i, finite ? "true" : "false", argmax, sum / n_vocab, std::sqrt(sumsq / n_vocab), logits[0], logits[1], logits[2]);
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
