"""The statistics the ablation notebooks report (experiments/ablations.py)."""

import numpy as np
import pytest

from experiments import ablations


def _runs(finals: dict[int, float]) -> dict[int, list[dict]]:
    # a train-only row after the last evaluation must not be mistaken for it
    return {
        s: [{"step": 1, "eval_loss": 9.0}, {"step": 2, "eval_loss": v}, {"step": 3, "loss": 0.1}]
        for s, v in finals.items()
    }


def test_summarize_is_mean_and_sample_std_of_the_last_evaluation():
    mean, std = ablations.summarize(_runs({0: 1.0, 1: 2.0, 2: 4.0}))
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert ablations.summarize(_runs({0: 1.5})) == (1.5, 0.0)


def test_summarize_pairs_by_seed_against_a_baseline():
    # a constant per-seed offset: the pairs differ by exactly 0.25 whatever each seed's level
    base = _runs({2: 2.0, 0: 1.0, 1: 3.0})  # another order than the runs': pairs go by seed, not position
    mean, std = ablations.summarize(_runs({0: 1.25, 1: 3.25, 2: 2.25}), baseline=base)
    assert mean == pytest.approx(0.25) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"baseline seeds \[0, 1\] differ from the runs' seeds \[0, 1, 2\]"):
        ablations.summarize(_runs({0: 1.0, 1: 1.0, 2: 1.0}), baseline=_runs({0: 1.0, 1: 1.0}))
