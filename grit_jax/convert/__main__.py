"""``python -m grit_jax.convert {hf-to-grit,grit-to-hf,gguf-to-grit}``: Hugging Face
(MistralForCausalLM, LlamaForCausalLM, MixtralForCausalLM) <-> grit_jax params, and
llama-architecture GGUF (llama.cpp) files -> grit_jax params."""

from __future__ import annotations

import argparse
import resource
import sys
import time

from grit_jax import cli
from grit_jax.convert import gguf, hf


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m grit_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-grit", help="Hugging Face directory -> Orbax params directory")
    a.add_argument("--hf", required=True, help="directory with config.json + safetensors "
                   "(model_type mistral, llama or mixtral)")
    a.add_argument("--out", required=True, help="params directory to write")
    a.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    a.add_argument("--overwrite", action="store_true",
                   help="replace an existing params directory at --out (default: refuse)")
    b = sub.add_parser("grit-to-hf", help="Orbax params directory -> Hugging Face directory")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", help="params directory written by grit_jax")
    src.add_argument("--workdir", help="training workdir (exports the latest checkpoint)")
    b.add_argument("--step", type=int, default=None, help="with --workdir: this step")
    b.add_argument("--tokenizer", default=None,
                   help="tokenizer file or folder to ship (default: the one beside the params)")
    b.add_argument("--out", required=True, help="Hugging Face directory to write")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype in the safetensors files (default: the params' dtype)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit in GiB")
    b.add_argument("--lora-adapters", action="store_true",
                   help="a LoRA model: write only its adapters, in the PEFT layout "
                        "(adapter_config.json + adapter_model.safetensors; default: the "
                        "adapters merged into full weights)")
    b.add_argument("--base-model", default="",
                   help="with --lora-adapters: base_model_name_or_path in adapter_config.json")
    b.add_argument("--overwrite", action="store_true",
                   help="replace every model file at --out (default: refuse if it holds any)")
    g = sub.add_parser("gguf-to-grit", help="llama-architecture GGUF file -> Orbax params "
                                            "directory (dequantized, with its tokenizer)")
    g.add_argument("--gguf", required=True, help="GGUF file (general.architecture = llama)")
    g.add_argument("--out", required=True, help="params directory to write")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing params directory at --out (default: refuse)")
    args = parser.parse_args(argv)
    if args.command == "grit-to-hf" and not args.max_shard_gb > 0:
        raise cli.UserError(f"--max-shard-gb {args.max_shard_gb}: must be > 0")
    if args.command == "grit-to-hf" and args.step is not None and args.step < 0:
        raise cli.UserError(f"--step {args.step}: must be >= 0")
    t0 = time.time()
    if args.command == "hf-to-grit":
        config = hf.hf_to_grit(args.hf, args.out, param_dtype=args.param_dtype,
                               overwrite=args.overwrite)
    elif args.command == "gguf-to-grit":
        config = gguf.gguf_to_grit(args.gguf, args.out, param_dtype=args.param_dtype,
                                   overwrite=args.overwrite)
    else:
        config = hf.grit_to_hf(args.params or args.workdir, args.out, dtype=args.dtype,
                               max_shard_bytes=int(args.max_shard_gb * 2**30),
                               step=args.step, tokenizer=args.tokenizer, overwrite=args.overwrite,
                               adapters_only=args.lora_adapters, base_model=args.base_model)
    print(f"{args.command}: {config.family} {config.num_params() / 1e6:.1f}M params -> {args.out} "
          f"({time.time() - t0:.1f}s, peak RSS {_peak_rss_gib():.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
