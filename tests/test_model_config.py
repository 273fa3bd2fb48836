"""The per-model config files: TFS's ModelServerConfig text (names, version_labels) and the
proxy's TOML settings (latest policy, weights, shadow); bad files are refused naming the
file and line, and a refused reload leaves the settings in force."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from batchproxy.config import BatchingConfig
from batchproxy.fleet.versions import LatestPolicy, ModelSettings, ShadowSettings
from batchproxy.model_config import ConfigError, ConfigFiles, ConfigReloader, parse_proxy_config
from batchproxy.priority import Priority

TFS_FILE = """# as TFS reads it
model_config_list {
  config {
    name: "my_mnist_model"
    base_path: "/models/my_mnist_model"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config { name: "other" base_path: "/models/other" }
}
"""

PROXY_FILE = """[models.my_mnist_model]
latest = "share:0.5"   # the newest version once on half the fleet
weights = { "2" = 5 }
shadow = { version = 3, sample = 0.25, max_inflight = 1 }
latency_slo_ms = 50
"""


def files(tmp_path: Path, tfs: str = TFS_FILE, ours: str = PROXY_FILE) -> ConfigFiles:
    (tmp_path / "models.config").write_text(tfs)
    (tmp_path / "proxy.toml").write_text(ours)
    return ConfigFiles(str(tmp_path / "models.config"), str(tmp_path / "proxy.toml"))


def test_both_files_combine_into_each_models_settings(tmp_path: Path) -> None:
    settings = files(tmp_path).load()
    assert settings["my_mnist_model"] == ModelSettings(
        labels={"stable": 1, "canary": 2}, latest=LatestPolicy("share", 0.5),
        weights={2: 5.0}, shadow=ShadowSettings(3, 0.25, 1), latency_slo_ms=50.0)
    assert settings["other"] == ModelSettings()


@pytest.mark.parametrize(("tfs", "ours", "expected"), [
    (TFS_FILE.replace("version_labels {", "version_label {", 1), PROXY_FILE,
     "models.config, line 8: not a valid ModelServerConfig"),
    (TFS_FILE, PROXY_FILE.replace("weights", "weigths"),
     "proxy.toml, line 3: model 'my_mnist_model': unknown key 'weigths'"),
    (TFS_FILE, PROXY_FILE.replace('"share:0.5"', '"newest"'),
     "proxy.toml, line 2: model 'my_mnist_model': latest policy 'newest'"),
    (TFS_FILE, PROXY_FILE.replace('"2" = 5', '"2" = 60, "3" = 60'),
     "proxy.toml, line 3: model 'my_mnist_model': weights add up to more than 100"),
    (TFS_FILE, PROXY_FILE.replace("sample = 0.25", "sample = 2"),
     "proxy.toml, line 4: model 'my_mnist_model': sample is between 0 and 1"),
    (TFS_FILE, PROXY_FILE.replace("= 50", "= -1"),
     "proxy.toml, line 5: model 'my_mnist_model': a number of milliseconds"),
    (TFS_FILE, "[models.m\nlatest = 1\n", "proxy.toml: not valid TOML"),
    (TFS_FILE, "latest = \"highest\"\n", "proxy.toml, line 1: unknown table or key 'latest'"),
])
def test_a_bad_file_is_refused_naming_its_line(tmp_path: Path, tfs: str, ours: str,
                                                expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        files(tmp_path, tfs, ours).load()
    assert expected in str(raised.value).replace(str(tmp_path) + "/", "")


def test_a_refused_reload_keeps_the_settings_in_force(tmp_path: Path) -> None:
    applied: list[dict[str, ModelSettings]] = []
    reloader = ConfigReloader(files(tmp_path), applied.append)
    assert applied[-1]["my_mnist_model"].labels == {"stable": 1, "canary": 2}
    (tmp_path / "proxy.toml").write_text("[models.my_mnist_model]\nlatest = \"pinned:x\"\n")
    with pytest.raises(ConfigError):
        reloader.reload()
    assert len(applied) == 1
    (tmp_path / "proxy.toml").write_text("[models.my_mnist_model]\nlatest = \"pinned:2\"\n")
    reloader.reload()
    assert applied[-1]["my_mnist_model"].latest == LatestPolicy("pinned", 2)


def test_latest_policies_pick_from_what_the_fleet_holds() -> None:
    available = {1: 3, 2: 1}
    assert LatestPolicy.parse("highest").pick(available, 4) == 2
    assert LatestPolicy.parse("share:0.5").pick(available, 4) == 1
    assert LatestPolicy.parse("share:0.25").pick(available, 4) == 2
    assert LatestPolicy.parse("pinned:1").pick({2: 4}, 4) == 1
    assert LatestPolicy.parse("highest").pick({}, 0) is None
    for bad in ("share:0", "share:1.5", "pinned:-1", "highest:1", "lowest"):
        with pytest.raises(ValueError):
            LatestPolicy.parse(bad)


BATCHING_FILE = """[models.seq]
priority = "sheddable"

[models.seq.batching]
max_batch_size = 64
batch_timeout_micros = 1000
allowed_batch_sizes = [8, 16, 32, 64]
padding_policy = "min_cost"
variable_length_inputs = { tokens = 0, text = "<pad>" }
length_buckets = [32, 64, 128, 256]
length_following_outputs = { token_scores = "1=tokens", embeddings = "tokens" }

[models.compiled]
batching = { allowed_batch_sizes = [4, 8] }
"""

FLAGS = BatchingConfig(max_batch_size=32, batch_timeout_micros=2000, max_enqueued_rows=640,
                       padding_policy="batch_down")


def batching_files(tmp_path: Path, ours: str = BATCHING_FILE) -> ConfigFiles:
    (tmp_path / "proxy.toml").write_text(ours)
    return ConfigFiles(None, str(tmp_path / "proxy.toml"), batching=FLAGS)


def test_a_batching_table_amends_the_flags_per_model(tmp_path: Path) -> None:
    settings = batching_files(tmp_path).load()
    seq = settings["seq"]
    assert seq.priority is Priority.SHEDDABLE
    assert seq.batching == replace(
        FLAGS, max_batch_size=64, batch_timeout_micros=1000,
        allowed_batch_sizes=(8, 16, 32, 64), padding_policy="min_cost",
        variable_length_inputs=(("tokens", 0.0), ("text", "<pad>")),
        length_buckets=(32, 64, 128, 256),
        length_following_outputs=(("token_scores", 1, "tokens"), ("embeddings", 1, "tokens")))
    # Allowed sizes alone set max_batch_size to their last (TFS's rule); the rest are the
    # flags, including the flags' padding policy and queue bound.
    assert settings["compiled"].batching == replace(FLAGS, max_batch_size=8,
                                                    allowed_batch_sizes=(4, 8))
    assert settings["compiled"].priority is None
    # A model without a table has no batching of its own: the flags apply.
    assert parse_proxy_config("[models.m]\nlatency_slo_ms = 5\n", "p.toml",
                              FLAGS)["m"]["batching"] is None


@pytest.mark.parametrize(("change", "expected"), [
    (("max_batch_size = 64", "max_batch_size = 48"),
     "line 7: model 'seq': batching: allowed_batch_sizes [8, 16, 32, 64]: the last entry "
     "must equal max_batch_size (48)"),
    (("max_batch_size = 64", "max_batch_size = 0"),
     "line 5: model 'seq': batching: max_batch_size must be at least 1"),
    (("max_batch_size = 64", "max_batch_size = 6400"),
     "line 5: model 'seq': batching: max_enqueued_rows must be at least max_batch_size"),
    (("batch_timeout_micros = 1000", "batch_timeout_micros = \"1ms\""),
     "line 6: model 'seq': batching: batch_timeout_micros: expected an integer"),
    (("\"min_cost\"", "\"cheapest\""),
     "line 8: model 'seq': batching: padding_policy: 'cheapest' is not one of pad_up"),
    (("[32, 64, 128, 256]", "[64, 32]"),
     "line 10: model 'seq': batching: length_buckets [64, 32] must be positive and "
     "strictly increasing"),
    (("\"1=tokens\"", "\"1=words\""),
     "line 11: model 'seq': batching: length_following_outputs token_scores:1=words"),
    (("\"1=tokens\"", "\"one=tokens\""),
     "line 11: model 'seq': batching: length_following_outputs: token_scores = 'one=tokens'"),
    (("tokens = 0,", "tokens = true,"),
     "line 9: model 'seq': batching: variable_length_inputs: expected { INPUT = PAD_VALUE"),
    (("length_buckets", "length_bucket"),
     "line 10: model 'seq': batching: length_bucket: unknown batching key"),
    (("[4, 8]", "[8, 4]"),
     "line 14: model 'compiled': batching: allowed_batch_sizes [8, 4] must be strictly"),
    (("\"sheddable\"", "\"urgent\""),
     "line 2: model 'seq': priority 'urgent': expected 'critical' or 'sheddable'"),
    (("batching = {", "batching = 3 #"),
     "line 14: model 'compiled': batching: expected a table"),
])
def test_a_bad_batching_value_is_refused_naming_its_line(
        tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        batching_files(tmp_path, BATCHING_FILE.replace(*change)).load()
    assert str(raised.value).replace(str(tmp_path) + "/", "") \
        .startswith("proxy.toml, " + expected)


def test_a_refused_batching_reload_keeps_the_settings_in_force(tmp_path: Path) -> None:
    applied: list[dict[str, ModelSettings]] = []
    reloader = ConfigReloader(batching_files(tmp_path), applied.append)
    assert applied[-1]["compiled"].batching is not None
    (tmp_path / "proxy.toml").write_text(BATCHING_FILE.replace("[4, 8]", "[4, 9, 8]"))
    with pytest.raises(ConfigError):
        reloader.reload()
    assert len(applied) == 1
    (tmp_path / "proxy.toml").write_text(BATCHING_FILE.replace("[4, 8]", "[2, 4]"))
    reloader.reload()
    batching = applied[-1]["compiled"].batching
    assert batching is not None and batching.allowed_batch_sizes == (2, 4)
    assert batching.padding_policy == "batch_down"  # still over the flags
def test_fields_the_proxy_does_not_act_on_are_logged_once_per_reload(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="batchproxy.model_config")
    reloader = ConfigReloader(files(tmp_path), lambda settings: None)
    reloader.reload()
    left = [r.getMessage() for r in caplog.records if "left to the replicas" in r.getMessage()]
    assert len(left) == 2  # at start, then once for the reload
    assert left[0].endswith("my_mnist_model: base_path, model_platform, "
                            "model_version_policy; other: base_path")
    caplog.clear()
    (tmp_path / "models.config").write_text('model_config_list { config { name: "m" } }')
    reloader.reload()  # nothing set beyond what the proxy uses: nothing to say
    assert not [r for r in caplog.records if "left to the replicas" in r.getMessage()]
