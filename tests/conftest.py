"""Shared fixtures: the corpus (WikiText-2 from ../shared where present, else the fixture), the
tiny config, and token arrays prepared once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# hub look-ups must fail fast in tests instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CORPUS = REPO / "tests" / "data" / "corpus"
SHARED_CORPUS = REPO.parent / "shared" / "data" / "wikitext-2"
TINY_CONFIG = REPO / "tests" / "data" / "tiny.yaml"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fixture_corpus() -> Path:
    return FIXTURE_CORPUS


@pytest.fixture(scope="session")
def full_corpus() -> Path:
    if not (SHARED_CORPUS / "train.txt").is_file():
        pytest.skip(f"the full WikiText-2 corpus is not at {SHARED_CORPUS}")
    return SHARED_CORPUS


def tiny_raw_config() -> dict:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["data_dir"] = str(FIXTURE_CORPUS)
    return config


@pytest.fixture
def tiny_config() -> dict:
    from fairlm.config import resolve

    return resolve(tiny_raw_config())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Token arrays of the fixture corpus, prepared once per session (read-only for tests)."""
    from fairlm.config import resolve
    from fairlm.data import prepare

    out = tmp_path_factory.mktemp("data")
    config = resolve(tiny_raw_config())
    prepare(config["data"], config["data_dir"], out, log=lambda _m: None)
    return out
