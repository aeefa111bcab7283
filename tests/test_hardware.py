"""grit_jax.hardware: one chip table, matched on the exact device_kind (the kinds libtpu reports
for each TPU generation are checked in test_aot.py, which has libtpu)."""

import pytest

from grit_jax import hardware

# device_kind -> (name, peak bf16 TFLOP/s, HBM GiB): one row per chip.
EXPECTED = {
    "TPU v4": ("v4", 275, 32),
    "TPU v5 lite": ("v5e", 197, 16),
    "TPU v5": ("v5p", 459, 95),
    "TPU v6 lite": ("v6e", 918, 32),
    "NVIDIA A100-SXM4-40GB": ("A100-40GB", 312, 40e9 / 2**30),
    "NVIDIA A100-SXM4-80GB": ("A100-80GB", 312, 80e9 / 2**30),
    "NVIDIA H100 80GB HBM3": ("H100", 989, 80e9 / 2**30),
    "NVIDIA H200": ("H200", 989, 141e9 / 2**30),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_chip(kind):
    chip = hardware.chip(kind)
    name, tflops, hbm = EXPECTED[kind]
    assert chip.name == name and chip.device_kind == kind
    assert chip.peak_flops == tflops * 1e12
    assert chip.hbm_bytes / 2**30 == pytest.approx(hbm)
    assert chip.hbm_bw > 0 and hardware.peak_flops(kind) == chip.peak_flops


def test_matching_is_exact_not_by_substring():
    # v5p reports "TPU v5", a prefix of v5e's "TPU v5 lite": substring matching gave v5p v5e's
    # 197 TFLOP/s and an MFU 2.3x too high.
    assert hardware.chip("TPU v5").name == "v5p" and hardware.chip("TPU v5 lite").name == "v5e"
    assert hardware.chip("TPU v5p") is None and hardware.chip("tpu v5") is None
    assert hardware.chip("cpu") is None and hardware.peak_flops("cpu") is None
    assert hardware.peak_flops("cpu", override=1e12) == 1e12
    assert hardware.peak_flops("TPU v5", override=0.0) == 459e12
    with pytest.raises(ValueError, match="no figures for device kind 'TPU v9'"):
        hardware.require_chip("TPU v9")


def test_one_table_serves_training_and_aot():
    """train.py's MFU and the AOT report's roofline read the same table (no second copy)."""
    import inspect

    from grit_jax import train
    from grit_jax.aot import estimate

    assert "hardware.peak_flops" in inspect.getsource(train)
    assert "hardware.require_chip" in inspect.getsource(estimate)
    assert len({c.device_kind for c in hardware.CHIPS}) == len(hardware.CHIPS)
