"""``python -m grit_jax.aot --config configs/gritlm_7b.py --topology v5p:4x4x4``: the report.

Exits 1 with advice when the step does not fit; 2 on a bad config or topology.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from grit_jax import cli, outputs
from grit_jax.aot import advice, compile_step, format_report

FLAGS = flags.FLAGS
if "config" not in FLAGS:  # the same config files as training
    config_flags.DEFINE_config_file("config", None, "training config file (get_config())",
                                    lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v4:4x4x4, v5e:16x16, v6e:8x8")
flags.DEFINE_integer("slices", 1, "number of slices (multislice over the data-centre network)")
flags.DEFINE_string("lengths", "256,2048,2048",
                    "query, passage and generative sequence lengths of the compiled step")
flags.DEFINE_string("json", None, "also write the report to this file")
flags.DEFINE_string("hlo", None, "also write the compiled step's optimized HLO text to this file")


def main(argv=None) -> int:
    """The command line: user errors are one line and exit 2 (grit_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    cli.absl_flags(argv, "python -m grit_jax.aot")
    if FLAGS.config is None or FLAGS.topology is None:
        raise cli.UserError("--config and --topology are required, e.g. --config "
                            "configs/gritlm_7b.py --topology v5p:4x4x4")
    try:
        lengths = tuple(int(x) for x in FLAGS.lengths.split(","))
        if len(lengths) != 3 or min(lengths) <= 0:
            raise ValueError
    except ValueError:
        raise cli.UserError(f"--lengths={FLAGS.lengths!r}: three positive integers expected "
                            f"(query, passage, generative)") from None
    if FLAGS.slices < 1:
        raise cli.UserError(f"--slices={FLAGS.slices}: must be >= 1")
    compiled, report = compile_step(FLAGS.config, FLAGS.topology, lengths, FLAGS.slices)
    print(format_report(report))
    if FLAGS.json:
        outputs.write_file(FLAGS.json, json.dumps(report, indent=1), overwrite=True)
    if FLAGS.hlo and compiled is not None:
        outputs.write_file(FLAGS.hlo, compiled.as_text(), overwrite=True)
    if not report["fits"]:
        print("does not fit; knobs that help:\n  - " + "\n  - ".join(advice(report, FLAGS.config)))
        return 1
    return 0


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
