"""experiments/dispatch_table.py: the dispatch entry a GPU benchmark supports."""

import pytest

from experiments.dispatch_table import entry_from_rows


def _row(op, impl, m, us, k=4096):
    return {"op": op, "impl": impl, "m": m, "k": k, "n": 4096, "device_us": us, "slope_us": us}


def test_fastest_per_m_forward_when_decoding_forward_and_backward_when_training():
    rows = [
        _row("dequantize", "pallas", None, 10.0), _row("dequantize", "xla", None, 14.0),
        # M=1: pallas wins the forward (the backward, where xla wins big, does not count when decoding)
        _row("forward", "pallas", 1, 5.0), _row("forward", "xla", 1, 9.0), _row("forward", "pallas_dequant", 1, 7.0),
        _row("backward", "pallas", 1, 90.0), _row("backward", "xla", 1, 10.0),
        _row("forward", "pallas", 16, 6.0), _row("forward", "xla", 16, 9.5), _row("forward", "pallas_dequant", 16, 8.0),
        # M=512: pallas_dequant by forward + backward (pallas' faster forward does not make up for its backward)
        _row("forward", "pallas", 512, 50.0), _row("backward", "pallas", 512, 200.0),
        _row("forward", "pallas_dequant", 512, 60.0), _row("backward", "pallas_dequant", 512, 70.0),
        _row("forward", "xla", 512, 65.0), _row("backward", "xla", 512, 75.0),
        _row("forward", "pallas_dequant", 4096, 400.0), _row("backward", "pallas_dequant", 4096, 410.0),
        _row("forward", "xla", 4096, 405.0), _row("backward", "xla", 4096, 420.0),
        _row("forward", "bf16 dot", 4096, 100.0),  # the baseline is never a choice
    ]  # fmt: skip
    entry = entry_from_rows(rows, commit="abc1234", date="2026-12-02")
    assert entry["dequantize"] == "pallas"
    assert entry["qmatmul"] == [[16, "pallas"], [None, "pallas_dequant"]]
    assert entry["measured"]["commit"] == "abc1234"


def test_dequantize_choice_compares_the_same_shapes_and_only_impls():
    rows = [_row("dequantize", "pallas", None, 10.0), _row("dequantize", "pallas", None, 30.0, k=11008),
            _row("dequantize", "pallas select", None, 5.0), _row("dequantize", "xla", None, 12.0),
            _row("dequantize", "xla", None, 35.0, k=11008),
            _row("dequantize", "mosaic_gpu", None, 1.0)]  # fmt: skip
    # "pallas select" is a benchmark variant, not an impl; mosaic_gpu timed one shape of two: not comparable
    assert entry_from_rows(rows, commit="", date="")["dequantize"] == "pallas"
    rows.append(_row("dequantize", "mosaic_gpu", None, 20.0, k=11008))
    assert entry_from_rows(rows, commit="", date="")["dequantize"] == "mosaic_gpu"  # 21 us against 40 and 47


def test_times_are_summed_over_shapes():
    rows = [_row("forward", "pallas", 1, 5.0, k=4096), _row("forward", "xla", 1, 6.0, k=4096),
            _row("forward", "pallas", 1, 20.0, k=11008), _row("forward", "xla", 1, 10.0, k=11008)]  # fmt: skip
    assert entry_from_rows(rows, commit="", date="")["qmatmul"] == [[None, "xla"]]  # 25 vs 16 us


def test_the_decode_kernel_is_bounded_to_decode_sizes():
    rows = [_row("forward", "pallas_decode", 1, 3.0), _row("forward", "pallas", 1, 5.0), _row("forward", "xla", 1, 9.0),
            _row("forward", "pallas_decode", 16, 4.0), _row("forward", "pallas", 16, 6.0),
            _row("forward", "xla", 16, 5.0)]  # fmt: skip
    # only decode sizes measured: past M=16, the best of the others at M=16 (xla, 5 us)
    assert entry_from_rows(rows, commit="", date="")["qmatmul"] == [[16, "pallas_decode"], [None, "xla"]]
    rows += [_row("forward", "xla", 512, 60.0), _row("backward", "xla", 512, 60.0),
             _row("forward", "pallas_dequant", 512, 50.0), _row("backward", "pallas_dequant", 512, 50.0)]  # fmt: skip
    assert entry_from_rows(rows, commit="", date="")["qmatmul"] == [[16, "pallas_decode"], [None, "pallas_dequant"]]


def test_a_cpu_run_has_nothing_to_choose_from():
    rows = [dict(_row("forward", "xla", 512, 1.0), device_us=None)]
    with pytest.raises(ValueError, match="no device times"):
        entry_from_rows(rows, commit="", date="")
