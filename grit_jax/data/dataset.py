"""A folder of GRIT JSONL files as a TFDS array_record dataset (``python -m grit_jax.data build``).

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

from grit_jax import outputs
from grit_jax.data import formats, records
from grit_jax.data.tokenizers import (Tokenizer, default_tokenizer_path, load_tokenizer,
                                      tokenizer_fingerprint)

BUILDER_NAME = "grit_jsonl"
DEFAULT_MAX_LENGTHS = {"query": 256, "passage": 2048, "generative": 2048}


def split_name(path: str) -> str:
    """The split name of a JSONL file: its stem with non-word characters replaced by '_'."""
    return re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])


CONTEXT = 2  # the stored mask on a chat's cached-document tokens (1: loss tokens, 0: the rest)


def stored_mask(seg: formats.Encoded) -> np.ndarray:
    """A segment's mask as stored: its ``context`` leading tokens marked CONTEXT."""
    mask = np.array(seg.mask, np.int32)
    mask[:seg.context] = CONTEXT
    return mask


def from_stored(ids: np.ndarray, mask: np.ndarray) -> formats.Encoded:
    """A stored segment back as Encoded (the inverse of stored_mask)."""
    return formats.Encoded(ids, (mask == 1).astype(np.int32),
                           context=int((mask == CONTEXT).sum()))


def encode_record(tok: Tokenizer, kind: str, rec: dict, max_lengths: dict, path: str = "",
                  line: int = 0):
    """Token segments of one normalised record: (tokens, masks, lengths, num_pos, truncated),
    ``truncated`` the number of segments cut at their max length, per limit."""
    if kind == records.EMBEDDING:
        fields = [("query", rec["query"], "query")]
        fields += [(f"{f}[{i}]", p, "passage")
                   for f in ("pos", "neg") for i, p in enumerate(rec[f])]
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
               else formats.encode_chat(tok, rec["messages"], context=rec.get("context")))
        n = max_lengths["generative"]
        segs = [formats.Encoded(enc.ids[:n], enc.mask[:n], cut=max(len(enc) - n, 0),
                                context=min(enc.context, n))]
        fields, num_pos = [("text", None, "generative")], 0
    truncated = {}
    for (_, _, limit), seg in zip(fields, segs):
        if seg.cut:
            truncated[limit] = truncated.get(limit, 0) + 1
    return (np.concatenate([s.ids for s in segs]).astype(np.int32),
            np.concatenate([stored_mask(s) for s in segs]).astype(np.int8),
            np.asarray([len(s) for s in segs], np.int32), num_pos, truncated)


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
            truncated = {}
            for _, r in rows:
                for limit, count in r[4].items():
                    truncated[limit] = truncated.get(limit, 0) + count
            datasets[name] = {"file": os.path.basename(path), "kind": kind, "examples": len(rows),
                              "min_neg": int(min(negs)),
                              "tokens": int(sum(len(r[0]) for _, r in rows)),
                              "context": int(sum(bool((r[1] == CONTEXT).any()) for _, r in rows)),
                              "truncated": truncated}
            examples[name] = rows
        if not datasets:
            raise ValueError(f"{self._input_dir}: no valid records in any file")
        self.info.metadata.update({
            "datasets": datasets, "skipped": dict(self._skips.counts),
            "tokenizer": tokenizer_fingerprint(self._tok), "max_lengths": self._max_lengths,
            "source": os.path.abspath(self._input_dir)})
        return {name: self._generate_examples(rows) for name, rows in examples.items()}

    # TFDS prints "Downloading and preparing dataset ..." / "... downloaded and prepared": there is
    # no download here, and the build command prints its own summary.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _generate_examples(self, rows):
        for line, (tokens, masks, lengths, num_pos, _) in rows:
            yield line, {"tokens": tokens, "masks": masks, "lengths": lengths,
                         "num_pos": num_pos, "line": line}


def build(input_dir: str, output_dir: str, *, tokenizer: str | Tokenizer | None = None,
          max_lengths: dict | None = None, skip_invalid: bool = False, overwrite: bool = False):
    """Build the dataset into output_dir (whole or not at all; a folder holding files is
    replaced only with ``overwrite``); returns its TFDS builder (metadata holds the counts)."""
    outputs.check_target(output_dir, overwrite=overwrite, flag="--output")
    for limit, n in (max_lengths or {}).items():
        if n is None or int(n) <= 0:
            raise ValueError(f"max {limit} length {n}: must be > 0")
    records.list_jsonl(input_dir)  # a missing or empty input folder fails before any work
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(
        tokenizer or default_tokenizer_path())
    with outputs.staged_dir(output_dir, overwrite=overwrite, flag="--output") as staging:
        builder = GritJsonl(input_dir=input_dir, tokenizer=tok, max_lengths=max_lengths,
                            skip_invalid=skip_invalid, data_dir=staging,
                            file_format="array_record")
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return tfds.builder_from_directory(dataset_path(output_dir))


def dataset_path(data_dir: str) -> str:
    """The versioned directory of a dataset built into data_dir (which may also name the
    dataset's own folder or its version folder, as printed by TFDS)."""
    data_dir = os.path.normpath(data_dir)
    if re.fullmatch(r"\d+\.\d+\.\d+", os.path.basename(data_dir)) and os.path.isfile(
            os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    if os.path.basename(data_dir) == BUILDER_NAME:
        data_dir = os.path.dirname(data_dir)
    root = os.path.join(data_dir, BUILDER_NAME)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{data_dir}: no grit_jax dataset here (run "
                                "python -m grit_jax.data build --input JSONL_DIR "
                                f"--output {data_dir})")
    versions = sorted(v for v in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", v))
    if not versions:
        raise FileNotFoundError(f"{root}: no built version")
    return os.path.join(root, versions[-1])


def open_dataset(data_dir: str):
    """(builder, metadata) of a built dataset, read through TFDS without TensorFlow."""
    builder = tfds.builder_from_directory(dataset_path(data_dir))
    return builder, dict(builder.info.metadata)
