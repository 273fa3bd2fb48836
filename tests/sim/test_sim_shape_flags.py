"""The shape flags `serve` and `simulate` share: allowed sizes reach the simulated proxy;
variable-length batching, which fixed-shape workloads cannot exercise, is refused."""

from __future__ import annotations

import pytest

from batchproxy.cli import build_parser
from batchproxy.sim.cli import sim_config


def parse(*argv: str):
    return build_parser().parse_args(["simulate", *argv])


def test_allowed_sizes_and_policy_reach_the_simulated_proxy():
    config = sim_config(parse("--max_batch_size", "16", "--allowed_batch_sizes", "4,16",
                              "--padding_policy", "batch_down"))
    assert (config.allowed_batch_sizes, config.padding_policy) == ((4, 16), "batch_down")


@pytest.mark.parametrize("flag", ["--variable_length_inputs", "--length_buckets"])
def test_variable_length_flags_are_refused_not_ignored(flag):
    with pytest.raises(ValueError, match="not simulated"):
        sim_config(parse(flag, "8" if flag == "--length_buckets" else "tokens"))
