"""grit_jax.checkpoint: what a failed restore leaves in the log."""

import asyncio
import gc
import logging

from grit_jax import checkpoint


def abandon_a_failed_read():
    """A read future that failed and that nobody awaits, collected (as a damaged restore
    leaves its other reads): asyncio logs it when it is garbage collected."""
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError('OUT_OF_RANGE: Error reading "params.lm_head.kernel/0.0"'))
    loop.close()
    del future
    gc.collect()


def test_a_failed_restore_keeps_its_abandoned_reads_out_of_the_log(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])  # as a fresh process
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        abandon_a_failed_read()
        assert "exception was never retrieved" in caplog.text  # what a user would see
        caplog.clear()
        line = checkpoint.damage(ValueError("Encountered error while reading array index"
                                            " See full TensorStore details: ..."))
        assert line == "Encountered error while reading array index"
        abandon_a_failed_read()
        abandon_a_failed_read()
        assert caplog.text == ""
        logging.getLogger("asyncio").error("Task was destroyed but it is pending!")
        assert "pending" in caplog.text  # other asyncio errors still show
