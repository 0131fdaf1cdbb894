"""tasks/operations/tracking.py: where an online run's W&B API key comes from (the environment, a Prefect Secret
block on a real Prefect API of the test harness) and the start that fails, naming both, when there is none. No
network: nothing here talks to W&B."""

from __future__ import annotations

import os

import pytest

from flows.cli import main
from tasks.config import EXIT_BAD_INPUT, build_config
from tasks.operations.tracking import (
    API_KEY_BLOCK,
    API_KEY_ENV,
    WandbKeyMissing,
    require_wandb_key,
    start_wandb_run,
)

ONLINE = {"tracking": {"mode": "online", "entity": "acme-ml"}}


@pytest.fixture
def no_key(monkeypatch):
    """No WANDB_API_KEY, and whatever the test sets removed again afterwards."""
    monkeypatch.setenv(API_KEY_ENV, "restored-afterwards")
    monkeypatch.delenv(API_KEY_ENV)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def without_prefect_api(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL

    assert not PREFECT_API_URL.value(), "a Prefect profile sets PREFECT_API_URL: this test needs none"


def test_offline_and_disabled_need_no_key(no_key):
    for mode in ("offline", "disabled"):
        assert require_wandb_key(build_config({"tracking": {"mode": mode}})) is None


def test_the_environment_key_wins(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "k" * 40)
    assert require_wandb_key(build_config(ONLINE)) == f"${API_KEY_ENV}"


def test_without_a_prefect_api_only_the_environment_is_asked(no_key, without_prefect_api):
    with pytest.raises(WandbKeyMissing, match=f"{API_KEY_ENV} is not set and the Prefect Secret block "
                                              f"'{API_KEY_BLOCK}' is not read here"):
        require_wandb_key(build_config(ONLINE))


def test_an_online_step_without_a_key_never_runs_offline_silently(no_key, without_prefect_api, tmp_path):
    """A W&B run that would start online without a key (a Ray worker whose node lacks the secret) fails by name
    instead of logging to local files nobody syncs."""
    config = build_config({**ONLINE, "tracking": {**ONLINE["tracking"], "output_dir": str(tmp_path)}})
    with pytest.raises(WandbKeyMissing, match=API_KEY_ENV):
        start_wandb_run(config, "train", "vit")
    assert not any(tmp_path.iterdir())


def test_the_train_command_exits_2_before_training(no_key, without_prefect_api, tmp_path, capsys):
    code = main(["train", "--set", "tracking.mode=online", "--set", f"tracking.output_dir={tmp_path}",
                 "--shards", str(tmp_path / "no-shards")])
    error = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert error.startswith("vit-pipeline train: error: tracking.mode is online") and API_KEY_BLOCK in error
    assert "Traceback" not in error
    assert not any(tmp_path.iterdir())  # no shards read, no Ray started, no run directory


# On the test harness's Prefect API, which stays up to the module's end: these come last.
def test_the_key_comes_from_the_prefect_secret_block(prefect_api, no_key):
    from prefect.blocks.system import Secret

    Secret(value="s" * 40).save(API_KEY_BLOCK, overwrite=True)
    try:
        assert require_wandb_key(build_config(ONLINE)) == f"Prefect Secret block {API_KEY_BLOCK}"
        assert os.environ[API_KEY_ENV] == "s" * 40  # where W&B and a local Ray's workers read it
    finally:
        Secret.delete(API_KEY_BLOCK)


def test_no_secret_block_fails_naming_the_block_and_the_variable(prefect_api, no_key):
    with pytest.raises(WandbKeyMissing) as raised:
        require_wandb_key(build_config(ONLINE))
    message = str(raised.value)
    assert f"there is none in the Prefect Secret block {API_KEY_BLOCK!r}" in message
    assert f"{API_KEY_ENV} is not set" in message and "tracking.mode=offline" in message
    assert API_KEY_ENV not in os.environ
