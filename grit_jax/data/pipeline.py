"""GRIT training batches: a grain ``MapDataset`` indexed by step, so batches are deterministic,
sliced per process, and resumable from the iterator state.

Step ``s`` of the embedding stream belongs to epoch ``s // steps_per_epoch``. Each epoch's plan
shuffles every dataset (JSONL file) on its own, cuts it into global batches of ``query_batch``
queries, pools the leftovers of all datasets into mixed batches (as the reference does) and
shuffles the batch order; the last incomplete mixed batch is dropped and counted. Generative
samples run as their own stream, one global batch per step. Process ``p`` of ``P`` takes rows
``[p*B/P, (p+1)*B/P)`` of every global batch and reads only those records.

The mixture: by default each dataset contributes all its examples once per epoch. A cap
(``max_per_dataset``) keeps a fixed random subset of each larger dataset (fixed by the seed,
as the reference's ``max_example_num_per_dataset``); ``mixture`` sets a dataset's examples per
epoch, as a count (``msmarco=20000``, the reference's ``num_samples``) or as a multiple of its
(capped) size (``nq=0.5x``, ``tiny=3x``): drawn without replacement, in as many fresh shuffles
of the dataset as the count needs. Every draw is a function of (seed, epoch): resumable.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from grit_jax.data import formats, records
from grit_jax.data.dataset import from_stored, open_dataset, tokenizer_fingerprint
from grit_jax.losses import MODES


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the batches look like; global sizes (all processes together)."""

    data_dir: str
    query_batch: int = 8  # queries per step; each brings group_size passages
    generative_batch: int = 8  # generative samples per step
    group_size: int = 2  # 1 positive + group_size - 1 hard negatives per query
    mode: str = "unified"  # embedding-only / generative-only baselines drop a stream
    seed: int = 0
    num_epochs: int = 1  # length of the step-indexed dataset, in embedding epochs
    smallest_bucket: int = 16  # buckets: powers of two from here up to each max length
    # Declared padded lengths per kind ("query", "passage", "generative"), replacing the powers
    # of two: a small fixed set of shapes (one compiled step program per combination).
    buckets: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Examples per epoch per dataset: "name=count" or "name=<multiple>x", comma-separated; a
    # name is a dataset's file ("msmarco.jsonl") or split name ("msmarco"); unlisted: 1x.
    mixture: str = ""
    max_per_dataset: int = 0  # >0: a fixed random subset of at most this many per dataset
    num_threads: int = 2  # grain prefetch threads (measured: see benchmarks/data_pipeline.py)
    prefetch: int = 8


class GritBatches:
    """Step-indexed GRIT batches (local to this process) read from a built dataset."""

    def __init__(self, cfg: PipelineConfig, *, process_index: int | None = None,
                 process_count: int | None = None, tokenizer=None):
        self.cfg = cfg
        self.pi = jax.process_index() if process_index is None else process_index
        self.pc = jax.process_count() if process_count is None else process_count
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
        builder, self.meta = open_dataset(cfg.data_dir)
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.meta["tokenizer"]:
            raise ValueError(f"{cfg.data_dir}: built with tokenizer "
                             f"{self.meta['tokenizer']['file']} "
                             f"(sha256 {self.meta['tokenizer']['sha256'][:12]}), not "
                             f"{tokenizer.path}; rebuild the dataset")
        self.pad_id = int(self.meta["tokenizer"]["pad_id"])
        ds = self.meta["datasets"]
        kinds = {records.EMBEDDING: [], records.GENERATIVE: []}
        for name in sorted(ds):
            kinds[ds[name]["kind"]].append(name)
        self.emb_names = kinds[records.EMBEDDING] if cfg.mode != "generative" else []
        self.gen_names = kinds[records.GENERATIVE] if cfg.mode != "embedding" else []
        self.sources = {n: builder.as_data_source(n) for n in self.emb_names + self.gen_names}
        self.counts = self._mixture()  # examples per epoch of each dataset in use
        lengths = self.meta["max_lengths"]
        declared = dict(cfg.buckets)
        unknown = sorted(set(declared) - set(lengths))
        if unknown:
            raise ValueError(f"data.buckets: unknown kind(s) {unknown} (expected some of "
                             f"{sorted(lengths)})")
        self.buckets = {}
        for kind, longest in lengths.items():
            if declared.get(kind):
                if max(declared[kind]) < longest:
                    raise ValueError(f"data.buckets.{kind}={','.join(map(str, declared[kind]))}: "
                                     f"the largest is below the dataset's max {kind} length "
                                     f"{longest} ({cfg.data_dir})")
                self.buckets[kind] = sorted(declared[kind])
            else:
                self.buckets[kind] = formats.length_buckets(longest, cfg.smallest_bucket)
        self._validate()
        self.emb_steps, self.emb_dropped = self._steps(self.emb_names, cfg.query_batch, True)
        self.gen_steps, self.gen_dropped = self._steps(self.gen_names, cfg.generative_batch, False)
        self.steps_per_epoch = self.emb_steps or self.gen_steps

    def context_examples(self) -> int:
        """Generative examples in use that follow a cached document (``context`` records)."""
        ds = self.meta["datasets"]
        old = [n for n in self.gen_names if "context" not in ds[n]]
        if old:
            raise ValueError(f"{self.cfg.data_dir}: built before documents of context chats were "
                             f"marked (datasets {old}); rebuild it")
        return sum(ds[n]["context"] for n in self.gen_names if self.counts.get(n))

    # ------------------------------------------------------------------------------------------
    def _validate(self):
        c, problems = self.cfg, []
        if c.mode != "generative" and not self.emb_names:
            problems.append(f"mode={c.mode} needs embedding data; {c.data_dir} has none")
        if c.mode != "embedding" and not self.gen_names:
            problems.append(f"mode={c.mode} needs generative data; {c.data_dir} has none")
        for name, size in (("query_batch", c.query_batch),
                           ("generative_batch", c.generative_batch)):
            if size <= 0 or size % self.pc:
                problems.append(f"{name}={size} must be a positive multiple of the process "
                                f"count ({self.pc})")
        if c.group_size < 1:
            problems.append(f"group_size={c.group_size} must be >= 1")
        for n in self.emb_names:
            if c.group_size > 1 and self.meta["datasets"][n]["min_neg"] == 0:
                problems.append(f"dataset {n} ({self.meta['datasets'][n]['file']}) has records "
                                f"without hard negatives, but group_size={c.group_size} needs "
                                f"{c.group_size - 1} per query: set --config.data.group_size=1 "
                                f"(in-batch negatives only), or add \"neg\" passages to every "
                                f"record")
        if problems:
            raise ValueError("Invalid data pipeline: " + "; ".join(problems))

    def _mixture(self) -> dict[str, int]:
        """Examples per epoch of each dataset in use, from ``mixture`` and ``max_per_dataset``."""
        c, ds = self.cfg, self.meta["datasets"]
        if c.max_per_dataset < 0:
            raise ValueError(f"data.max_per_dataset={c.max_per_dataset} must be >= 0 (0: no cap)")
        alias = {**{ds[n]["file"]: n for n in ds}, **{n: n for n in ds}}
        counts = {n: len(self._pool(n)) for n in self.sources}
        seen = set()
        for entry in filter(None, (e.strip() for e in c.mixture.split(","))):
            key, eq, value = (x.strip() for x in entry.partition("="))
            if not eq or key not in alias:
                raise ValueError(f"data.mixture entry {entry!r}: expected name=count or "
                                 f"name=<multiple>x with name one of {sorted(ds)} (or its file)")
            name = alias[key]
            if name in seen:
                raise ValueError(f"data.mixture names {name} twice")
            seen.add(name)
            try:
                n = (round(float(value[:-1]) * len(self._pool(name))) if value.endswith("x")
                     else int(value))
            except ValueError:
                n = -1
            if n < 0:
                raise ValueError(f"data.mixture entry {entry!r}: the value must be a count >= 0 "
                                 f"or a multiple like 0.5x")
            if name in counts:  # datasets of a stream this mode leaves out are not read
                counts[name] = n
        return counts

    def _pool(self, name) -> np.ndarray:
        """The examples of a dataset that take part: all, or a seeded subset under the cap."""
        n, cap = len(self.sources[name]), self.cfg.max_per_dataset
        if not cap or n <= cap:
            return np.arange(n)
        d = sorted(self.meta["datasets"]).index(name)
        return np.sort(np.random.default_rng([self.cfg.seed, 5, d]).permutation(n)[:cap])

    def _draw(self, name, epoch, key) -> np.ndarray:
        """This epoch's examples of a dataset in shuffled order: counts[name] of its pool, in
        fresh shuffles (``key`` names the stream's random stream, d its dataset)."""
        pool, want = self._pool(name), self.counts[name]
        passes = [pool[np.random.default_rng([*key, p] if p else key).permutation(len(pool))]
                  for p in range(-(-want // max(len(pool), 1)))]
        return np.concatenate(passes)[:want] if passes else np.zeros(0, np.int64)

    def _steps(self, names, batch, per_dataset):
        """(full batches per epoch, examples dropped per epoch) for a stream."""
        if not names:
            return 0, 0
        sizes = [self.counts[n] for n in names]
        if per_dataset:
            full = sum(s // batch for s in sizes)
            left = sum(s % batch for s in sizes)
            steps, dropped = full + left // batch, left % batch
        else:
            steps, dropped = sum(sizes) // batch, sum(sizes) % batch
        if steps == 0:
            raise ValueError(f"{self.cfg.data_dir}: {sum(sizes)} examples in {names} are fewer "
                             f"than one global batch of {batch}")
        return steps, dropped

    @functools.lru_cache(maxsize=4)
    def embedding_plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Global batches of (dataset, index) for an epoch: single-dataset first, then mixed."""
        b, batches, leftovers = self.cfg.query_batch, [], []
        for d, name in enumerate(self.emb_names):
            perm = self._draw(name, epoch, [self.cfg.seed, epoch, 1, d])
            full = len(perm) // b * b
            batches += [[(d, int(i)) for i in perm[k:k + b]] for k in range(0, full, b)]
            leftovers += [(d, int(i)) for i in perm[full:]]
        rng = np.random.default_rng([self.cfg.seed, epoch, 2])
        leftovers = [leftovers[i] for i in rng.permutation(len(leftovers))]
        batches += [leftovers[k:k + b] for k in range(0, len(leftovers) // b * b, b)]
        return [batches[i] for i in rng.permutation(len(batches))]

    @functools.lru_cache(maxsize=4)
    def generative_plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Global generative batches of (dataset, index) for a generative epoch."""
        items = [(d, int(i)) for d, n in enumerate(self.gen_names)
                 for i in np.sort(self._draw(n, epoch, [self.cfg.seed, epoch, 3, d]))]
        perm = np.random.default_rng([self.cfg.seed, epoch, 3]).permutation(len(items))
        b = self.cfg.generative_batch
        return [[items[j] for j in perm[k:k + b]] for k in range(0, self.gen_steps * b, b)]

    def _local(self, rows):
        n = len(rows) // self.pc
        return rows[self.pi * n:(self.pi + 1) * n]

    def _segments(self, name, index):
        ex = self.sources[name][index]
        bounds = np.cumsum(ex["lengths"])[:-1]
        ids, masks = np.split(ex["tokens"], bounds), np.split(ex["masks"], bounds)
        return ([from_stored(i, m) for i, m in zip(ids, masks)],
                int(ex["num_pos"]))

    def _group(self, epoch, d, index):
        """The query and its group_size passages: a random positive, then sampled negatives."""
        segs, num_pos = self._segments(self.emb_names[d], index)
        query, pos, neg = segs[0], segs[1:1 + num_pos], segs[1 + num_pos:]
        rng = np.random.default_rng([self.cfg.seed, epoch, 4, d, index])
        chosen = [pos[int(rng.integers(len(pos)))]]
        k = self.cfg.group_size - 1
        if k:
            pool = np.arange(len(neg))
            if len(neg) < k:  # oversample, as the reference: repeat the list, then sample
                pool = np.tile(pool, math.ceil(k / len(neg)))
            chosen += [neg[int(j)] for j in rng.choice(pool, k, replace=False)]
        return query, chosen

    def _pad(self, encoded, kind, prefix, mask_name):
        length = formats.bucket_length(max(len(e) for e in encoded), self.buckets[kind])
        ids, valid, mask = formats.pad_batch(encoded, length, self.pad_id)
        out = {f"{prefix}_ids": ids, f"{prefix}_valid": valid, f"{prefix}_{mask_name}": mask}
        if kind == "generative":  # the cached document of context chats (gen_attention="context")
            out[f"{prefix}_context"] = np.arange(length)[None, :] < np.asarray(
                [e.context for e in encoded])[:, None]
        return out

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of global batch ``step`` (numpy, right-padded to buckets)."""
        out = {}
        if self.emb_names:
            epoch, k = divmod(int(step), self.emb_steps)
            queries, passages = [], []
            for d, i in self._local(self.embedding_plan(epoch)[k]):
                q, ps = self._group(epoch, d, i)
                queries.append(q)
                passages += ps
            out.update(self._pad(queries, "query", "query", "pool"))
            out.update(self._pad(passages, "passage", "passage", "pool"))
        if self.gen_names:
            epoch, k = divmod(int(step), self.gen_steps)
            rows = [self._segments(self.gen_names[d], i)[0][0]
                    for d, i in self._local(self.generative_plan(epoch)[k])]
            out.update(self._pad(rows, "generative", "gen", "loss"))
        return out

    def dataset(self) -> grain.MapDataset:
        """Random-access batches, one per step, for ``num_epochs`` embedding epochs."""
        return grain.MapDataset.range(self.cfg.num_epochs * self.steps_per_epoch).map(
            self.local_batch)

    def iterator(self):
        """A grain iterator with ``get_state()`` / ``set_state()`` and background prefetch."""
        opts = grain.ReadOptions(num_threads=self.cfg.num_threads,
                                 prefetch_buffer_size=self.cfg.prefetch)
        return iter(self.dataset().to_iter_dataset(opts))

    def summary(self) -> str:
        """One line about the streams, including what each epoch drops."""
        parts = []
        if self.emb_names:
            parts.append(f"embedding: {len(self.emb_names)} dataset(s), "
                         f"{self.emb_steps} steps/epoch "
                         f"of {self.cfg.query_batch} queries x {self.cfg.group_size} passages, "
                         f"{self.emb_dropped} example(s) left out per epoch (last partial batch)")
        if self.gen_names:
            parts.append(f"generative: {len(self.gen_names)} dataset(s), {self.gen_steps} "
                         f"steps/epoch of {self.cfg.generative_batch}, {self.gen_dropped} left out "
                         f"per epoch")
        return "; ".join(parts) + "; " + self.mixture_summary()

    def mixture_summary(self) -> str:
        """The effective mixture: each dataset's examples per epoch, of how many, and its share
        of its stream."""
        parts = []
        for names in (self.emb_names, self.gen_names):
            total = sum(self.counts[n] for n in names) or 1
            for n in names:
                have, use = len(self.sources[n]), self.counts[n]
                note = f" (cap {self.cfg.max_per_dataset})" if len(self._pool(n)) < have else ""
                parts.append(f"{self.meta['datasets'][n]['file']} {use} of {have}{note}, "
                             f"{100 * use / total:.0f}%")
        return "mixture per epoch: " + "; ".join(parts)


def parse_buckets(spec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """PipelineConfig.buckets from ``config.data.buckets`` ({kind: "256,512"}; "" or absent:
    the default powers of two)."""
    out = []
    for kind, text in sorted(dict(spec or {}).items()):
        if not str(text).strip():
            continue
        try:
            sizes = tuple(int(x) for x in str(text).split(","))
        except ValueError:
            raise ValueError(f"data.buckets.{kind}={text!r}: comma-separated lengths expected, "
                             f"e.g. '512,1024,2048'") from None
        if min(sizes) <= 0:
            raise ValueError(f"data.buckets.{kind}={text!r}: lengths must be positive")
        out.append((kind, sizes))
    return tuple(out)


def pad_to(local: dict[str, np.ndarray], lengths: dict[str, int], pad_id: int) -> dict:
    """Right-pad every ``{prefix}_*`` array to ``lengths[prefix]`` columns."""
    out = {}
    for key, arr in local.items():
        prefix = key.split("_")[0]
        extra = lengths[prefix] - arr.shape[1]
        fill = pad_id if key.endswith("_ids") else 0
        out[key] = np.pad(arr, ((0, 0), (0, extra)), constant_values=fill) if extra > 0 else arr
    return out


def global_batch(local: dict[str, np.ndarray], sharding, pad_id: int) -> dict[str, jax.Array]:
    """Global jax.Arrays from every process's local part (lengths agreed across processes)."""
    prefixes = sorted({k.split("_")[0] for k in local})
    mine = np.asarray([local[f"{p}_ids"].shape[1] for p in prefixes], np.int32)
    if jax.process_count() > 1:
        mine = np.asarray(multihost_utils.process_allgather(mine)).max(axis=0)
    local = pad_to(local, dict(zip(prefixes, mine.tolist())), pad_id)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
