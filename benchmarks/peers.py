"""What the speed benchmarks share: the model shapes, a saved random Mistral, the measured matmul
peak, synthetic GRIT batches and the PyTorch reference of the unified GRIT step.

Every benchmark builds one random ``MistralForCausalLM`` with transformers, saves it, and loads the
same files on both sides, so grit_jax and the reference run the same weights on the same inputs.
"""

import json
import os
import platform
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the demo's Wikipedia pages (demo/), configs/

from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)

# Mistral-architecture shapes (random weights, the real 32k tokenizer).
SHAPES = {
    # ~283M parameters: the train-step / MFU model of the speed issue ("a few hundred million").
    "m283": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
    # ~57M parameters: sweeps and generation, where many points or many steps are timed.
    "m57": dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2),
    # ~19M parameters: the RAG latency model; the sequence-length and batch sweeps.
    "m19": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2),
    # ~5M parameters: the smoke test of every benchmark.
    "m5": dict(vocab_size=32000, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2),
}


def save_model(directory, shape, seed=0):
    """A random MistralForCausalLM saved by transformers, with the real Mistral tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from grit_jax.data.tokenizers import default_tokenizer_path

    torch.manual_seed(seed)
    cfg = dict(max_position_embeddings=8192, sliding_window=None, tie_word_embeddings=False,
               rope_theta=10000.0, **(SHAPES[shape] if isinstance(shape, str) else shape))
    MistralForCausalLM(MistralConfig(**cfg)).save_pretrained(directory)
    shutil.copyfile(default_tokenizer_path(), os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "legacy": True, "padding_side": "right"}, f)
    return cfg


def cpu_model():
    """The CPU's model name and its widest vector ISA, from /proc/cpuinfo (Linux)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("", platform.machine(), "x86_64"):
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = next((label for flag, label in (("amx_tile", "AMX"), ("avx512f", "AVX-512"),
                                          ("avx2", "AVX2")) if flag in flags), None)
    return f"{name} ({isa})" if isa else name


def machine():
    """One line naming this machine, for the results."""
    import jax
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
            f"({jax.default_backend()}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def in_fresh_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) run in a new Python process: (its result, the process's peak RSS in
    MiB). Each side of a benchmark measured this way holds only its own library and model."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_with_peak_rss, (fn, args, kwargs))


def peak_rss_mib():
    """This process's peak resident memory so far, MiB: VmHWM of /proc/self/status (Linux),
    which starts afresh in a new process (ru_maxrss would carry the parent's over fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource  # elsewhere: ru_maxrss (KiB on Linux, bytes on macOS)

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(maxrss / (2 ** 20 if platform.system() == "Darwin" else 1024), 1)


def _with_peak_rss(fn, args, kwargs):
    out = fn(*args, **kwargs)
    return out, peak_rss_mib()


def matmul_peak(n=2048, repeats=5):
    """Measured float32 matmul FLOP/s of this machine: jnp (XLA) and torch, an n x n x n product."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.RandomState(0)
    a, b = (rng.randn(n, n).astype(np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    jax_s = median_seconds(lambda: mm(ja, jb).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_s = median_seconds(lambda: ta @ tb, repeats)
    flops = 2.0 * n ** 3
    return {"n": n, "jax_flops_per_s": flops / jax_s, "torch_flops_per_s": flops / torch_s,
            "peak_flops_per_s": flops / min(jax_s, torch_s)}


def wiki_passages(n, words):
    """n real Wikipedia passages of about `words` words each."""
    from demo.wikipedia import articles

    text = " ".join(p for _, paras in articles() for p in paras).split()
    if len(text) < n * words:
        raise ValueError(f"only {len(text)} words of text for {n} x {words}")
    return [" ".join(text[i * words:(i + 1) * words]) for i in range(n)]


def grit_batch(n_queries, passages_per_query, n_gen, q_len, p_len, g_len, *, instruction=8,
               vocab=32000, seed=0):
    """A GRIT batch in grit_jax's layout (as data/pipeline.py yields it), random token ids.

    Sequences are full length (no padding); the first ``instruction`` tokens of each query and
    passage are the instruction (excluded from pooling); generative loss on the second half.
    """
    rng = np.random.RandomState(seed)

    def seqs(n, t):
        ids = rng.randint(3, vocab, (n, t)).astype(np.int32)
        ids[:, 0] = 1  # BOS
        return ids, np.ones((n, t), np.int32)

    batch = {}
    for prefix, n, t in (("query", n_queries, q_len),
                         ("passage", n_queries * passages_per_query, p_len)):
        ids, valid = seqs(n, t)
        pool = valid.copy()
        pool[:, :instruction] = 0
        batch.update({f"{prefix}_ids": ids, f"{prefix}_valid": valid, f"{prefix}_pool": pool})
    ids, valid = seqs(n_gen, g_len)
    loss = np.zeros_like(valid)
    loss[:, g_len // 2:] = 1
    batch.update(gen_ids=ids, gen_valid=valid, gen_loss=loss)
    return batch


class TorchGritStep:
    """The reference's unified GRIT step on transformers' Mistral in PyTorch (float32).

    The published gritlm wheels ship only inference code, so this restates
    ``gritlm.training.model.GritLMTrainModel``: embeddings from the base model with
    ``is_causal=False`` (as ``gritlm.GritLM.encode``), mean pooling over non-instruction tokens,
    L2 normalisation, cross-entropy over q @ p.T / temperature with target i * P/Q; the
    generative loss is transformers' shift-by-one cross-entropy over loss tokens (mean); one
    backward of their sum, global-norm clipping, AdamW with linear decay.
    The losses it reports equal grit_jax's on the same weights and batch (checked by the
    benchmarks and tests/test_benchmarks.py).
    """

    def __init__(self, model_dir, *, lr, total_steps, temperature=0.02, clip_norm=1.0):
        import torch
        from transformers import MistralForCausalLM

        self.torch = torch
        self.model = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="sdpa")
        self.model.train()
        self.temperature, self.clip_norm = temperature, clip_norm
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.999),
                                     eps=1e-8, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: max(0.0, 1.0 - s / total_steps))

    def reps(self, ids, valid, pool):
        torch = self.torch
        h = self.model.model(input_ids=ids, attention_mask=valid, is_causal=False).last_hidden_state
        m = (pool * valid).unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    def __call__(self, batch):
        """One update; returns {"loss", "loss_rep", "loss_gen"} as floats."""
        torch = self.torch
        t = {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items()}
        self.opt.zero_grad(set_to_none=True)
        labels = torch.where(t["gen_loss"] * t["gen_valid"] == 1, t["gen_ids"], -100)
        loss_gen = self.model(input_ids=t["gen_ids"], attention_mask=t["gen_valid"],
                              labels=labels).loss
        q = self.reps(t["query_ids"], t["query_valid"], t["query_pool"])
        p = self.reps(t["passage_ids"], t["passage_valid"], t["passage_pool"])
        target = torch.arange(q.shape[0]) * (p.shape[0] // q.shape[0])
        loss_rep = torch.nn.functional.cross_entropy(q @ p.T / self.temperature, target)
        loss = loss_rep + loss_gen
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        self.sched.step()
        return {"loss": loss.item(), "loss_rep": loss_rep.item(), "loss_gen": loss_gen.item()}


class JaxGritStep:
    """grit_jax's unified GRIT step (the jitted, donated train step of train_step.py) on one
    device, with the same optimizer settings as TorchGritStep."""

    def __init__(self, model_dir, *, lr, total_steps, temperature=0.02, gen_sub_batch=None,
                 batch=None, **model_overrides):
        import jax

        from grit_jax import sharding
        from grit_jax.convert.hf import read_hf
        from grit_jax.train_step import (LossConfig, init_state, jit_train_step, make_optimizer,
                                         state_shardings)

        params, self.config = read_hf(model_dir)
        if model_overrides:
            self.config = self.config.replace(**model_overrides)
        n_gen = len(batch["gen_ids"]) if batch is not None else 32
        self.lc = LossConfig(temperature=temperature, gen_sub_batch=gen_sub_batch or n_gen)
        tx, schedule = make_optimizer(lr, total_steps, warmup_ratio=0.0)
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        state_sh = state_shardings(self.config, tx, mesh)
        self.state = jax.device_put(init_state(params, tx), state_sh)
        self.step = jit_train_step(self.config, self.lc, tx, schedule, mesh, state_sh)
        self.mesh, self.jax, self.sharding = mesh, jax, sharding

    def __call__(self, batch):
        with self.sharding.activate(self.mesh):
            self.state, metrics = self.step(self.state, batch)
        metrics = self.jax.device_get(metrics)
        return {k: float(metrics[k]) for k in ("loss", "loss_rep", "loss_gen")}


def max_rel_diff(a, b, floor=1e-4):
    """Largest relative difference between two lists of loss dicts; values below ``floor``
    (a contrastive loss the step has already driven to ~1e-6) are compared absolutely."""
    return max(abs(x[k] - y[k]) / max(floor, abs(y[k])) for x, y in zip(a, b) for k in x)


def write_result(name, result):
    """Print one JSON object and write it to benchmarks/results/<name>.json (or under
    $BENCHMARK_RESULTS_DIR)."""
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), **result}
    results = os.environ.get("BENCHMARK_RESULTS_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results")
    out = os.path.join(results, f"{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result
