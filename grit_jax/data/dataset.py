"""A folder of GRIT JSONL files as a TFDS array_record dataset (CLI: ``grit_jax.data.build``).

One split per JSONL file (the file identity is what lets every embedding batch come from a single
dataset). Records are validated and tokenised at build time with exact spans, so training reads
ready token arrays: per example ``tokens``/``masks`` hold the segments back to back (query, then
positives, then negatives; or one generative sample), ``lengths`` the segment lengths. No
TensorFlow is needed (``file_format='array_record'``); read with ``open_dataset``.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from grit_jax.data import formats, records
from grit_jax.data.tokenizers import (Tokenizer, default_tokenizer_path, load_tokenizer,
                                      tokenizer_fingerprint)

BUILDER_NAME = "grit_jsonl"
DEFAULT_MAX_LENGTHS = {"query": 256, "passage": 2048, "generative": 2048}


def split_name(path: str) -> str:
    """The split name of a JSONL file: its stem with non-word characters replaced by '_'."""
    return re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])


def encode_record(tok: Tokenizer, kind: str, rec: dict, max_lengths: dict, path: str = "",
                  line: int = 0):
    """Token segments of one normalised record: (tokens, masks, lengths, num_pos)."""
    if kind == records.EMBEDDING:
        fields = [("query", rec["query"], "query")]
        fields += [(f"{f}[{i}]", p, "passage") for f in ("pos", "neg") for i, p in enumerate(rec[f])]
        segs = []
        for field, (instruction, text), limit in fields:
            try:
                segs.append(formats.encode_embed(tok, text, instruction,
                                                 max_length=max_lengths[limit]))
            except formats.InstructionTooLong as e:
                raise records.RecordError(path, line, field, e.detail,
                                          "instruction_too_long") from None
        num_pos = len(rec["pos"])
    else:
        enc = (formats.encode_text(tok, rec["text"]) if "text" in rec
               else formats.encode_chat(tok, rec["messages"]))
        n = max_lengths["generative"]
        segs, num_pos = [formats.Encoded(enc.ids[:n], enc.mask[:n])], 0
    return (np.concatenate([s.ids for s in segs]).astype(np.int32),
            np.concatenate([s.mask for s in segs]).astype(np.int8),
            np.asarray([len(s) for s in segs], np.int32), num_pos)


class GritJsonl(tfds.core.GeneratorBasedBuilder):
    """GRIT JSONL folder as a TFDS dataset: one split per file, tokenised examples."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, input_dir: str | None = None, tokenizer: Tokenizer | None = None,
                 max_lengths: dict | None = None, skip_invalid: bool = False, **kw):
        self._input_dir, self._tok = input_dir, tokenizer
        self._max_lengths = {**DEFAULT_MAX_LENGTHS, **(max_lengths or {})}
        self._skips = records.SkipCounter(enabled=skip_invalid)
        super().__init__(**kw)

    def _info(self):
        return self.dataset_info_from_configs(
            description="GRIT training data (embedding and generative JSONL), tokenised.",
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "masks": tfds.features.Tensor(shape=(None,), dtype=np.int8),
                "lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "num_pos": np.int32,
                "line": np.int32,
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        """Validate and tokenise every file first, so metadata (skip counts) is complete."""
        files = records.list_jsonl(self._input_dir)
        names = [split_name(f) for f in files]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{self._input_dir}: files map to the same split name(s) {dupes}")
        datasets, examples = {}, {}
        for path, name in zip(files, names):
            kind, recs = records.read_records(path, self._skips)
            rows = []
            for line, rec in recs:
                try:
                    rows.append((line, encode_record(self._tok, kind, rec, self._max_lengths,
                                                     path, line)))
                except records.RecordError as e:
                    self._skips.handle(e)
            if not rows:
                continue  # an empty or all-skipped file: counted, no split
            negs = [len(r[2]) - 1 - r[3] for _, r in rows] if kind == records.EMBEDDING else [0]
            datasets[name] = {"file": os.path.basename(path), "kind": kind, "examples": len(rows),
                              "min_neg": int(min(negs)),
                              "tokens": int(sum(len(r[0]) for _, r in rows))}
            examples[name] = rows
        if not datasets:
            raise ValueError(f"{self._input_dir}: no valid records in any file")
        self.info.metadata.update({
            "datasets": datasets, "skipped": dict(self._skips.counts),
            "tokenizer": tokenizer_fingerprint(self._tok), "max_lengths": self._max_lengths,
            "source": os.path.abspath(self._input_dir)})
        return {name: self._generate_examples(rows) for name, rows in examples.items()}

    def _generate_examples(self, rows):
        for line, (tokens, masks, lengths, num_pos) in rows:
            yield line, {"tokens": tokens, "masks": masks, "lengths": lengths,
                         "num_pos": num_pos, "line": line}


def build(input_dir: str, output_dir: str, *, tokenizer: str | Tokenizer | None = None,
          max_lengths: dict | None = None, skip_invalid: bool = False):
    """Build the dataset; returns the built TFDS builder (its metadata holds the counts)."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(
        tokenizer or default_tokenizer_path())
    builder = GritJsonl(input_dir=input_dir, tokenizer=tok, max_lengths=max_lengths,
                        skip_invalid=skip_invalid, data_dir=output_dir,
                        file_format="array_record")
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
    return builder


def dataset_path(data_dir: str) -> str:
    """The versioned directory of a dataset built into data_dir."""
    root = os.path.join(data_dir, BUILDER_NAME)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{data_dir}: no grit_jax dataset here (run "
                                f"python -m grit_jax.data.build --input JSONL_DIR --output {data_dir})")
    versions = sorted(v for v in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", v))
    if not versions:
        raise FileNotFoundError(f"{root}: no built version")
    return os.path.join(root, versions[-1])


def open_dataset(data_dir: str):
    """(builder, metadata) of a built dataset, read through TFDS without TensorFlow."""
    builder = tfds.builder_from_directory(dataset_path(data_dir))
    return builder, dict(builder.info.metadata)
