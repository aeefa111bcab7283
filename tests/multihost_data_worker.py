"""One process of a 2-process jax.distributed run over loopback (see test_data_pipeline.py)."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(port, pid, data_dir, out):
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid)
    from jax.experimental import multihost_utils

    from grit_jax import sharding
    from grit_jax.data.pipeline import GritBatches, PipelineConfig, global_batch, pad_to

    cfg = PipelineConfig(data_dir, query_batch=8, generative_batch=8, group_size=2)
    mine = GritBatches(cfg)  # process index/count from jax.distributed
    assert (mine.pi, mine.pc) == (pid, 2)
    whole = GritBatches(cfg, process_index=0, process_count=1)
    mesh = sharding.make_mesh((2, 4, 1))
    for step in range(3):
        arrays = global_batch(mine.local_batch(step), sharding.batch_sharding(mesh), mine.pad_id)
        expected = whole.local_batch(step)
        for k, arr in arrays.items():
            full = np.asarray(multihost_utils.process_allgather(arr, tiled=True))
            exp = pad_to({k: expected[k]}, {k.split("_")[0]: full.shape[1]}, mine.pad_id)[k]
            np.testing.assert_array_equal(full, exp, err_msg=f"step {step} {k}")
    with open(out, "w") as f:
        f.write("ok")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
