"""Embeddings against the official gritlm package on the same weights, and batch independence."""

import numpy as np
import pytest

from grit_jax.data import formats
from grit_jax.inference import GritLM

QUERIES = ["What is the capital of France?", "how do vaccines train the immune system",
           "Symptoms of a common cold and how long they last in adults"]
DOCS = ["Paris is the capital and most populous city of France.",
        "Vaccines expose the immune system to a harmless piece of a pathogen so that it learns "
        "to recognise the real thing.", "Colds."]
INSTRUCTION = "Given a question, retrieve passages that answer it"


def gritlm_instruction(instruction):
    """The reference README's helper."""
    return "<|user|>\n" + instruction + "\n<|embed|>\n" if instruction else "<|embed|>\n"


@pytest.fixture(scope="module")
def reference_models(mistral_dir):
    import torch
    from gritlm import GritLM as RefGritLM

    cache = {}

    def get(attn, pooling):
        key = (attn, pooling)
        if key not in cache:
            cache[key] = RefGritLM(mistral_dir, mode="embedding", pooling_method=pooling, attn=attn,
                                   device="cpu", dtype=torch.float32)
        return cache[key]

    return get


@pytest.mark.parametrize("attn", ["bbcc", "cccc"])
@pytest.mark.parametrize("pooling", ["mean", "weightedmean", "lasttoken"])
@pytest.mark.parametrize("instruction", [INSTRUCTION, ""])
def test_embeddings_match_gritlm(mistral_dir, reference_models, attn, pooling, instruction):
    ref = reference_models(attn, pooling)
    ours = GritLM.from_pretrained(mistral_dir, attn=attn, pooling_method=pooling)
    texts = QUERIES + DOCS
    want = ref.encode(texts, instruction=gritlm_instruction(instruction), batch_size=6,
                      max_length=128)  # one padded batch of 6
    got = ours.encode(texts, instruction=instruction, batch_size=6, max_length=128)
    diff = np.abs(got - want).max()
    print(f"{attn} {pooling} instr={bool(instruction)}: max |diff| vs gritlm = {diff:.2e}")
    assert got.dtype == np.float32 and got.shape == want.shape
    assert diff <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_bidirectional_and_causal_embeddings_differ(request, family):
    path = request.getfixturevalue(f"{family}_dir")
    bb = GritLM.from_pretrained(path, attn="bbcc").encode(DOCS)
    cc = GritLM.from_pretrained(path, attn="cccc").encode(DOCS)
    assert np.abs(bb - cc).max() > 1e-3


def test_embedding_independent_of_batch(mistral_dir):
    model = GritLM.from_pretrained(mistral_dir)
    texts = QUERIES + DOCS
    batched = model.encode(texts, instruction=INSTRUCTION, batch_size=6)
    alone = np.stack([model.encode(t, instruction=INSTRUCTION) for t in texts])
    mixed = model.encode(texts[::-1], instruction=INSTRUCTION, batch_size=4)[::-1]
    np.testing.assert_allclose(batched, alone, atol=1e-6)
    np.testing.assert_allclose(batched, mixed, atol=1e-6)


def test_instruction_lengths_equal_reference(tokenizer, mistral_dir):
    """Our exact span equals the reference's separately tokenised prefix (BOS included)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(mistral_dir)
    for instruction in [INSTRUCTION, "", "Classify the sentiment: ", "Représente ce texte 日本"]:
        for text in DOCS + ["", "  leading spaces", "\nnewline first"]:
            enc = formats.encode_embed(tokenizer, text, instruction)
            prefix = formats.embed_instruction(instruction)
            ref_len = len(hf_tok(prefix, add_special_tokens=True)["input_ids"])
            assert int((enc.mask == 0).sum()) == ref_len, (instruction, text)
            assert enc.ids.tolist() == hf_tok(prefix + text)["input_ids"]


def test_encode_corpus_and_preformatted_instruction(mistral_dir):
    model = GritLM.from_pretrained(mistral_dir)
    a = model.encode_corpus([{"title": "France", "text": DOCS[0]}, {"text": DOCS[1]}])
    b = model.encode(["France " + DOCS[0], DOCS[1]])
    np.testing.assert_allclose(a, b, atol=1e-6)
    c = model.encode_queries(QUERIES, instruction=gritlm_instruction(INSTRUCTION))
    d = model.encode_queries(QUERIES, instruction=INSTRUCTION)
    np.testing.assert_allclose(c, d, atol=1e-6)


def test_truncation_keeps_instruction(tokenizer):
    enc = formats.encode_embed(tokenizer, "word " * 100, INSTRUCTION, max_length=40)
    assert len(enc) == 40
    full = formats.encode_embed(tokenizer, "word " * 100, INSTRUCTION)
    assert enc.ids.tolist() == full.ids[:40].tolist()
    assert (enc.mask == 0).sum() == (full.mask == 0).sum()
    with pytest.raises(ValueError, match="sentence 3: the instruction takes 25 tokens"):
        formats.encode_embed(tokenizer, "x", INSTRUCTION, max_length=10, where="sentence 3")


def test_projection_head_is_saved_exported_and_equals_gritlms(mistral_dir, tmp_path):
    """A model with an embedding head (projection_dim): its params directory, its Hugging Face
    export (projection.safetensors beside the transformers files) and the official GritLM with
    ``projection=N`` given that file's state dict all give the same embeddings."""
    import jax
    import torch
    from gritlm import GritLM as RefGritLM
    from safetensors.torch import load_file

    from grit_jax import checkpoint, weights
    from grit_jax.convert.hf import PROJECTION_FILE, grit_to_hf
    from grit_jax.model import init_projection

    params, config = weights.load(mistral_dir)
    config = config.replace(projection_dim=16)
    head = init_projection(config, seed=3)
    head["bias"] = 0.1 * jax.random.normal(jax.random.PRNGKey(4), head["bias"].shape)
    params = {**params, "projection": head}
    checkpoint.save_params(params, config, str(tmp_path / "params"))
    grit_to_hf(str(tmp_path / "params"), str(tmp_path / "hf"), tokenizer=mistral_dir)

    texts = QUERIES + DOCS
    got = GritLM.from_pretrained(str(tmp_path / "params"), tokenizer=mistral_dir).encode(
        texts, instruction=INSTRUCTION)
    from_hf = GritLM.from_pretrained(str(tmp_path / "hf")).encode(texts, instruction=INSTRUCTION)
    ref = RefGritLM(str(tmp_path / "hf"), mode="embedding", pooling_method="mean", attn="bbcc",
                    projection=16, device="cpu", dtype=torch.float32)
    ref.projection.load_state_dict(load_file(str(tmp_path / "hf" / PROJECTION_FILE)))
    want = ref.encode(texts, instruction=gritlm_instruction(INSTRUCTION), batch_size=6,
                      max_length=128)
    assert got.shape == (len(texts), 16)
    np.testing.assert_allclose(from_hf, got, atol=1e-6)
    diff = np.abs(got - want).max()
    print(f"projection head: max |diff| vs gritlm = {diff:.2e}")
    assert diff <= 1e-5
    plain = GritLM.from_pretrained(mistral_dir).encode(texts, instruction=INSTRUCTION)
    assert plain.shape[1] == config.hidden_size  # the head is what changed the width
