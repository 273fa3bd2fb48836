"""`batchproxy serve` flags map onto ProxyConfig one to one."""

from __future__ import annotations

import dataclasses

import pytest

from batchproxy.cli import build_parser, proxy_config
from batchproxy.config import BatchingConfig, ProxyConfig


def test_defaults_are_proxy_config_defaults():
    config = proxy_config(build_parser().parse_args(["serve"]))
    assert config == ProxyConfig()


def test_every_setting_has_a_flag():
    args = build_parser().parse_args(["serve"])
    renamed = {"replicas": "replica", "health_check_models": "health_check_model"}
    for field in dataclasses.fields(ProxyConfig):
        if field.name != "batching":
            assert hasattr(args, renamed.get(field.name, field.name)), field.name


def test_flags_reach_the_config(tmp_path):
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 500 }\n"
                      "max_enqueued_batches { value: 10 }\nnum_batch_threads { value: 8 }\n")
    config = proxy_config(build_parser().parse_args([
        "serve", "--replica", "a:1", "--replica", "b:2", "--workers", "3",
        "--batching_parameters_file", str(params), "--batch_timeout_micros", "700",
        "--health_check_model", "m", "--rest_body_timeout_s", "2.5"]))
    assert config.replicas == ("a:1", "b:2")
    assert config.workers == 3
    assert config.health_check_models == ("m",)
    assert config.rest_body_timeout_s == 2.5
    # The TFS file sets the batching; a flag overrides it; batches bound rows.
    assert config.batching == BatchingConfig(64, 700, 640)


def test_bad_batching_settings_are_refused():
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=8, max_enqueued_rows=4)
