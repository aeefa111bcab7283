"""RAG latency per caching mode: grit_jax vs the official gritlm + transformers, same weights.

The GRIT paper's protocol (section 4): sample A = a 1-token query with a 4000-token document,
sample B = a 4000-token query with a 1-token document; 16 new tokens; the document's key/value
states are computed when indexing and not timed. A timed answer covers the query's embedding
pass, the search, loading the cached states and generation. Both sides run the same random
Mistral-architecture model (by default m19: hidden 256, 4 layers, 8 heads / 2 kv heads, 32k
vocabulary, ~19M parameters, float32) on this CPU, one after the other, medians over repeats
after a warm-up.

Prints one JSON object and writes it to benchmarks/results/rag_latency.json.
Usage: python benchmarks/rag_latency.py [--repeats 5] [--doc-tokens 4000] [--shape m19]
"""

import argparse
import copy
import os
import tempfile

import peers
from timing import median_seconds  # benchmarks/timing.py

MODES = ("rag", "query", "doc", "query-doc", "doc-query")
NEW_TOKENS = 16
ANSWER_PREFIX = "The answer is"
def long_text(tok, n_tokens):
    """Real Wikipedia prose cut to about n_tokens tokens."""
    from demo.wikipedia import articles

    text = " ".join(p for _, paras in articles() for p in paras)
    ids, starts = tok.encode_with_offsets(text)
    if len(ids) <= n_tokens:
        raise ValueError(f"only {len(ids)} tokens of text available")
    return text[:starts[n_tokens]].strip()


# ----------------------------------------------------------------------------------------------
# grit_jax
# ----------------------------------------------------------------------------------------------
def ours(model_dir, samples, repeats, workdir):
    from grit_jax.inference import GritLM
    from grit_jax.rag import RAG

    model = GritLM.from_pretrained(model_dir, attn="bbcc")
    rags = {name: RAG.build(model, [doc], os.path.join(workdir, f"ours_{name}"))
            for name, (_, doc) in samples.items()}
    out, tokens = {"index_peak_rss_mib": peers.peak_rss_mib()}, {}
    for name, (query, doc) in samples.items():
        rag = rags[name]
        for mode in MODES:
            cache = None if mode == "rag" else mode

            def run():
                return rag.answer(query, cache=cache, max_new_tokens=NEW_TOKENS,
                                  answer_prefix=ANSWER_PREFIX, stop_at_eos=False,
                                  query_max_length=8192)

            out[f"{name}/{mode}"] = median_seconds(run, repeats)
            tokens[f"{name}/{mode}"] = run().tokens
    return out, tokens


# ----------------------------------------------------------------------------------------------
# The official gritlm package + transformers, following the reference RAG evaluation
# ----------------------------------------------------------------------------------------------
EMBED = "<|embed|>\n"
FULL_FORMAT_NO_EMBED = ("<|user|>\n{query}\n\n{doc}\n\nOptionally using the prior context answer "
                        "the query prior to it\n<|assistant|>\n")
AFTER = {
    "query": "\n<|user|>\n{doc}\n\nOptionally using the prior context answer the query prior to "
             "it\n<|assistant|>\n",
    "doc": "\n<|user|>\n{query}\n\nAnswer the prior query while optionally using the context "
           "prior to it\n<|assistant|>\n",
    "doc-query": "\n<|user|>\nAnswer the prior query while optionally using the context prior "
                 "to it\n<|assistant|>\n",
    "query-doc": "\n<|user|>\nOptionally using the prior context answer the query prior to it\n"
                 "<|assistant|>\n",
}


def reference(model_dir, samples, repeats):
    import torch
    from gritlm import GritLM as RefGritLM
    from transformers import DynamicCache

    ref = RefGritLM(model_dir, mode="unified", attn="bbcc", pooling_method="mean",
                    device="cpu", dtype=torch.float32)
    tok = ref.tokenizer

    def layers(cache):
        return [(layer.keys, layer.values) for layer in cache.layers]

    def doc_states(doc, instruction, special):
        """The document's embedding and states at index time (not timed), as the reference."""
        emb, cache = ref.encode_corpus([doc], get_cache=True, convert_to_tensor=True,
                                       instruction=instruction, add_special_tokens=special,
                                       max_length=8192)
        return emb, layers(cache)

    states = {name: (doc_states(doc, EMBED, True),
                     doc_states(doc, "\n" + EMBED, False)[1])  # query-doc, as the reference
              for name, (_, doc) in samples.items()}
    out, tokens = {"index_peak_rss_mib": peers.peak_rss_mib()}, {}
    for name, (query, doc) in samples.items():
        (doc_emb, doc_kv), doc_kv_nobos = states[name]
        for mode in MODES:
            def run(mode=mode):
                with torch.no_grad():
                    if "query" in mode and mode != "rag":
                        q_emb, q_cache = ref.encode_queries([query], get_cache=True,
                                                            convert_to_tensor=True,
                                                            instruction=EMBED, max_length=8192)
                        q_kv = layers(q_cache)
                    else:
                        q_emb = ref.encode_queries([query], convert_to_tensor=True,
                                                   instruction=EMBED, max_length=8192)
                    int(torch.argmax(q_emb @ doc_emb.T))  # the search (one document)
                    if mode == "rag":
                        text = FULL_FORMAT_NO_EMBED.format(query=query, doc=doc) + ANSWER_PREFIX
                        ids = tok(text, return_tensors="pt")["input_ids"]
                        past = None
                    else:
                        parts = {"query": [q_kv] if "query" in mode else [],
                                 "doc": [doc_kv_nobos if mode == "query-doc" else doc_kv]}
                        chain = [p for part in mode.split("-") for p in parts[part]]
                        kv = [tuple(torch.cat([c[i][j] for c in chain], dim=2) for j in (0, 1))
                              for i in range(len(chain[0]))]
                        past = DynamicCache(ddp_cache_data=copy.copy(kv))
                        n_cached = kv[0][0].shape[2]
                        suffix = AFTER[mode].format(query=query, doc=doc) + ANSWER_PREFIX
                        suffix_ids = tok(suffix, return_tensors="pt",
                                         add_special_tokens=False)["input_ids"]
                        # transformers 5 continues a cache when input_ids hold the whole sequence
                        # (the cached part's ids are not read again).
                        ids = torch.cat([torch.zeros((1, n_cached), dtype=torch.long),
                                         suffix_ids], dim=1)
                    gen = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       past_key_values=past, max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=tok.pad_token_id)
                    return gen[0, ids.shape[1]:].tolist()

            out[f"{name}/{mode}"] = median_seconds(run, repeats)
            tokens[f"{name}/{mode}"] = run()
    return out, tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--doc-tokens", type=int, default=4000)
    parser.add_argument("--shape", default="m19", choices=sorted(peers.SHAPES))
    parser.add_argument("--name", default="rag_latency")
    args = parser.parse_args(argv)

    from grit_jax.data.tokenizers import default_tokenizer

    tok = default_tokenizer()
    long = long_text(tok, args.doc_tokens)
    samples = {"A": ("France", long), "B": (long, "France")}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        peers.save_model(model_dir, args.shape)
        # Each side in its own process: its time, and its peak memory alone.
        (ref_s, ref_tokens), ref_rss = peers.in_fresh_process(
            reference, model_dir, samples, args.repeats)
        (our_s, our_tokens), our_rss = peers.in_fresh_process(
            ours, model_dir, samples, args.repeats, tmp)

    table = {}
    for name in samples:
        for mode in MODES:
            key = f"{name}/{mode}"
            table[key] = {
                "grit_jax_s": round(our_s[key], 4), "reference_s": round(ref_s[key], 4),
                "speedup_vs_reference": round(ref_s[key] / our_s[key], 2),
                "grit_jax_cut_vs_rag_pct": round(100 * (1 - our_s[key] / our_s[f"{name}/rag"]), 1),
                "reference_cut_vs_rag_pct": round(100 * (1 - ref_s[key] / ref_s[f"{name}/rag"]), 1),
                # Same tokens as the reference? (query-doc and doc-query join two caches with
                # re-rotated positions, where the reference keeps each part's: they differ by
                # design)
                "same_tokens": our_tokens[key] == ref_tokens[key],
            }
    return peers.write_result(args.name, {
        "machine": peers.machine(), "shape": args.shape, "model": peers.SHAPES[args.shape],
        "samples": {"A": f"1-token query, {len(tok.encode(long))}-token document",
                    "B": f"{len(tok.encode(long))}-token query, 1-token document"},
        "new_tokens": NEW_TOKENS, "repeats": args.repeats, "results": table,
        "peak_rss_mib": {  # the side's process: after indexing both documents, and in all
            "grit_jax": {"index": our_s["index_peak_rss_mib"], "all": our_rss},
            "reference": {"index": ref_s["index_peak_rss_mib"], "all": ref_rss}},
    })

if __name__ == "__main__":
    main()
