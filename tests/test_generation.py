"""Generation: greedy decoding equals transformers' greedy generate on the same weights."""

import numpy as np
import pytest

from grit_jax.data import formats
from grit_jax.generation import Sampling, generate_ids, sample_logits
from grit_jax.inference import GritLM

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves falling slowly",
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Count to three."}]]


@pytest.mark.parametrize("family", ["mistral", "llama", "mixtral"])
def test_greedy_matches_transformers(request, family):
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir = request.getfixturevalue(f"{family}_dir")
    ours = GritLM.from_pretrained(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    new = 12
    for prompt in PROMPTS:
        enc = formats.encode_chat(ours.tokenizer, prompt, add_generation_prompt=True)
        with torch.no_grad():
            want = ref.generate(torch.tensor(enc.ids[None].astype(np.int64)), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=2)
        want = want[0, len(enc):].tolist()
        ids, valid, _ = formats.pad_batch([enc], formats.bucket_length(len(enc), [32, 64]), 2)
        got, n = generate_ids(ours.params, ours.config, ids, valid, np.zeros(2, np.uint32),
                              max_new_tokens=new, eos_id=-1)
        assert np.asarray(got)[0].tolist() == want, prompt


def test_per_layer_weights_generate_what_the_scanned_stack_generates(mistral_dir):
    """GritLM decodes over per-layer weights (split once at load); the scanned training layout
    gives the same tokens, with and without a cached prefix."""
    from grit_jax.weights import load as load_model
    from grit_jax.model import KVCache, forward, is_per_layer

    model = GritLM.from_pretrained(mistral_dir)
    stacked, _ = load_model(mistral_dir)
    assert not is_per_layer(model.params)  # encoding reads the stack; generating splits it
    model.generate("Hi", max_new_tokens=1)
    assert is_per_layer(model.params) and not is_per_layer(stacked)
    enc = [formats.encode_chat(model.tokenizer, p, add_generation_prompt=True) for p in PROMPTS]
    ids, valid, _ = formats.pad_batch(enc, 64, 2)
    prefix = forward(stacked, model.config, ids[:, :8], None, mode="bidirectional",
                     cache=KVCache.empty(model.config, 3, 8)).cache
    for kw in ({}, {"prefix": prefix}):
        rest = (ids[:, 8:], valid[:, 8:]) if kw else (ids, valid)
        a, b = (generate_ids(p, model.config, *rest, np.zeros(2, np.uint32), max_new_tokens=8,
                             eos_id=-1, **kw)[0] for p in (stacked, model.params))
        assert np.asarray(a).tolist() == np.asarray(b).tolist()


def test_batched_generation_equals_one_at_a_time(mistral_dir):
    model = GritLM.from_pretrained(mistral_dir)
    batched = model.generate(PROMPTS, max_new_tokens=10)
    alone = [model.generate(p, max_new_tokens=10) for p in PROMPTS]
    assert batched == alone
    assert all(isinstance(r, str) for r in batched)


def test_generation_stops_at_eos(mistral_dir):
    model = GritLM.from_pretrained(mistral_dir)
    enc = formats.encode_chat(model.tokenizer, PROMPTS[0], add_generation_prompt=True)
    ids, valid, _ = formats.pad_batch([enc], 32, 2)
    free, _ = generate_ids(model.params, model.config, ids, valid, np.zeros(2, np.uint32),
                           max_new_tokens=8, eos_id=-1)
    stop_tok = int(np.asarray(free)[0, 2])  # pretend the third token is EOS
    out, n = generate_ids(model.params, model.config, ids, valid, np.zeros(2, np.uint32),
                          max_new_tokens=8, eos_id=stop_tok)
    out = np.asarray(out)[0].tolist()
    first = out.index(stop_tok)
    assert int(n[0]) == first + 1 and all(t == stop_tok for t in out[first:])


def test_token_budgets_share_one_program(mistral_dir):
    """Budgets up to the room (64 new tokens) run one compiled program: a 1-token latency probe
    reuses a longer answer's, and each shorter greedy answer is the longer one's start."""
    model = GritLM.from_pretrained(mistral_dir)
    prompt = formats.encode_chat(model.tokenizer, PROMPTS[0], add_generation_prompt=True).ids
    before = generate_ids._cache_size()
    got = [model.generate_tokens([prompt], max_new_tokens=k, stop_at_eos=False)[0]
           for k in (12, 1, 5)]
    assert generate_ids._cache_size() <= before + 1  # (none if an earlier test compiled it)
    assert [len(g) for g in got] == [12, 1, 5]
    assert got[1] == got[0][:1] and got[2] == got[0][:5]


def test_sampling_filters():
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda s: {int(sample_logits(logits, k, s)[0]) for k in keys}  # noqa: E731
    assert draw(Sampling(greedy=True)) == {0}
    assert draw(Sampling(greedy=False, top_k=2)) == {0, 1}
    assert draw(Sampling(greedy=False, top_p=0.7)) == {0, 1}
    assert draw(Sampling(greedy=False)) == {0, 1, 2, 3}
