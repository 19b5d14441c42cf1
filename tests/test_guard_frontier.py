"""scripts/guard_frontier.py: the bounds it prints are what its definitions say (no model run)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location("guard_frontier", Path(__file__).parents[1] / "scripts/guard_frontier.py")
frontier = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(frontier)

# three requests, two rungs (rerope, a repair) and full
KL = np.array([[0.05, 0.3], [0.5, 0.1], [0.5, 0.5]])
TTFT = np.array([[1.0, 5.0, 10.0]] * 3)


def test_perfect_predictor_serves_each_request_its_cheapest_rung_within_budget():
    cost, served = frontier.perfect(KL, TTFT, 0.2)
    assert cost == pytest.approx((1 + 5 + 10) / 30) and served == pytest.approx(2 / 3)
    cost, served = frontier.perfect(KL, TTFT, 0.2, spare=0.34)  # one request spared: the one full would serve
    assert cost == pytest.approx((1 + 5 + 1) / 30) and served == 1.0
    assert frontier.perfect(KL, TTFT, 0.0) == (pytest.approx(1.0), 0.0)


def test_one_feature_threshold_is_the_cheapest_split_keeping_90_percent():
    best = frontier.one_feature(KL, TTFT, np.array([0.0, 1.0, 2.0]), 0.2, ("", "blend:0.2"), descending=False)
    assert best == (pytest.approx((1 + 10 + 10) / 30), "rerope", 1)
    best = frontier.one_feature(KL, TTFT, np.array([2.0, 0.0, 1.0]), 0.2, ("", "blend:0.2"), descending=False)
    assert best == (pytest.approx((5 + 10 + 10) / 30), "blend:0.2", 1)  # request 1 first: only the repair keeps it
    assert frontier.one_feature(KL, TTFT, np.zeros(3), 0.01, ("", "blend:0.2"), False) == (1.0, "rerope", 0)  # all full
