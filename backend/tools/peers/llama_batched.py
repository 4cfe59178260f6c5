"""Many sequences in one llama.cpp batch through llama-cpp-python's low-level API (llama_decode with several
sequence ids per batch, as llama.cpp's server and its `batched` example run them): every prompt is prefilled in
batches of up to n_batch tokens, then each decode step carries one token of every sequence still running.
Greedy: the argmax of each sequence's logits. Used by llama_worker.py for the many-request workload."""

from __future__ import annotations


class BatchedContext:
    """A second llama.cpp context on the model of a `Llama` object, sized for `n_seq` sequences of `n_ctx` tokens
    in all (one unified KV buffer)."""

    def __init__(self, llm, n_ctx: int, n_seq: int, n_batch: int, threads: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        model = llm._model.model  # the loaded weights, shared with the single-sequence context
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = True
        self.ctx = lc.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {n_seq} sequences")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        self.n_batch = n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.settings = {"n_ctx": n_ctx, "n_seq_max": n_seq, "n_batch": n_batch, "kv_unified": True}

    def _decode(self, entries: list[tuple[int, int, int, bool]], outputs: list[list[int]]) -> None:
        """entries: (sequence, position, token, wants logits); each wanted logit row's argmax is appended."""
        import numpy as np

        b = self.batch
        b.n_tokens = len(entries)
        for i, (seq, pos, token, wants) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(wants)
            b.seq_id[i][0] = seq
        status = self.lc.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for i, (seq, _, _, wants) in enumerate(entries):
            if wants:
                row = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                outputs[seq].append(int(row.argmax()))

    def generate(self, prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        outputs: list[list[int]] = [[] for _ in prompts]
        prefill = [(s, p, t, p == len(prompt) - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)]
        for start in range(0, len(prefill), self.n_batch):
            self._decode(prefill[start : start + self.n_batch], outputs)
        while True:
            step = [
                (s, len(prompts[s]) + len(out) - 1, out[-1], True)
                for s, out in enumerate(outputs)
                if len(out) < lens[s]
            ]
            if not step:
                return outputs
            for start in range(0, len(step), self.n_batch):
                self._decode(step[start : start + self.n_batch], outputs)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
