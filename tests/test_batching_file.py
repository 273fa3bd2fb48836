"""TFS's batching parameters file, read as the BatchingParameters text proto TFS reads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from batchproxy.batching_file import IGNORED, parse_batching_parameters
from batchproxy.cli import build_parser, proxy_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batching.txt"
    path.write_text(text)
    return path


def test_a_commented_out_line_is_a_comment(tmp_path):
    path = write(tmp_path, "max_batch_size { value: 64 }\n"
                           "# max_batch_size { value: 4096 }\n"
                           "batch_timeout_micros { value: 500 }  # half a millisecond\n")
    assert parse_batching_parameters(path) == {"max_batch_size": 64,
                                               "batch_timeout_micros": 500}


def test_a_misspelt_field_names_the_field_and_its_line(tmp_path):
    path = write(tmp_path, "max_batch_size { value: 64 }\n\nmax_batch_sise { value: 8 }\n")
    with pytest.raises(ValueError, match=r'line 3: .*"max_batch_sise"') as err:
        parse_batching_parameters(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", [
    "max_batch_size { value: 64 }\nmax_batch_size { value: 32 }\n",  # given twice
    "max_batch_size { value: many }\n",
    "max_batch_size: 64\n",  # a wrapper, as in TFS: `{ value: 64 }`
])
def test_what_tfs_would_refuse_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match=r"line \d+: "):
        parse_batching_parameters(write(tmp_path, text))


def test_every_tfs_field_is_accepted_and_those_without_meaning_are_logged(tmp_path, caplog):
    path = write(tmp_path, """
        max_batch_size { value: 16 }
        batch_timeout_micros { value: 1000 }
        max_enqueued_batches { value: 4 }
        num_batch_threads { value: 8 }
        thread_pool_name { value: "batch_threads" }
        enable_large_batch_splitting { value: true }
        max_execution_batch_size { value: 16 }
        allowed_batch_sizes: 8
        allowed_batch_sizes: [16]
        pad_variable_length_inputs: true
    """)
    with caplog.at_level(logging.INFO, logger="batchproxy.batching_file"):
        settings = parse_batching_parameters(path)
    assert settings == {"max_batch_size": 16, "batch_timeout_micros": 1000,
                        "max_enqueued_rows": 64, "allowed_batch_sizes": (8, 16)}
    logged = caplog.text
    for name in IGNORED:
        assert f"{name} ignored" in logged


def test_an_empty_file_changes_nothing(tmp_path):
    assert parse_batching_parameters(write(tmp_path, "# nothing set\n")) == {}


def test_serve_refuses_a_bad_file_before_it_starts(tmp_path):
    path = write(tmp_path, "max_batch_size { value: 64 }\nnum_batch_thread { value: 4 }\n")
    args = build_parser().parse_args(["serve", "--batching_parameters_file", str(path)])
    with pytest.raises(ValueError, match=r'line 2: .*"num_batch_thread"'):
        proxy_config(args)


def test_allowed_batch_sizes_from_the_file_reach_the_config(tmp_path):
    path = write(tmp_path, "max_batch_size { value: 32 }\nallowed_batch_sizes: 8\n"
                           "allowed_batch_sizes: 16\nallowed_batch_sizes: 32\n")
    args = build_parser().parse_args(["serve", "--batching_parameters_file", str(path)])
    assert proxy_config(args).batching.allowed_batch_sizes == (8, 16, 32)


@pytest.mark.parametrize(("sizes", "match"), [
    ("8\nallowed_batch_sizes: 4\nallowed_batch_sizes: 32", "strictly increasing"),
    ("8\nallowed_batch_sizes: 16", "must equal max_batch_size"),
    ("0\nallowed_batch_sizes: 32", "positive"),
])
def test_a_bad_allowed_batch_sizes_list_is_refused_at_start(tmp_path, sizes, match):
    path = write(tmp_path, f"max_batch_size {{ value: 32 }}\nallowed_batch_sizes: {sizes}\n")
    args = build_parser().parse_args(["serve", "--batching_parameters_file", str(path)])
    with pytest.raises(ValueError, match=match):
        proxy_config(args)


def test_allowed_batch_sizes_flag_overrides_and_is_checked():
    args = build_parser().parse_args(["serve", "--max_batch_size", "16",
                                      "--allowed_batch_sizes", "4,8,16",
                                      "--padding_policy", "min_cost"])
    config = proxy_config(args).batching
    assert (config.allowed_batch_sizes, config.padding_policy) == ((4, 8, 16), "min_cost")
    args = build_parser().parse_args(["serve", "--allowed_batch_sizes", "8,16"])
    with pytest.raises(ValueError, match="max_batch_size"):
        proxy_config(args)
