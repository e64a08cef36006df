"""Fixtures every test directory shares; plain helper functions live in `helpers.py`."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model_path():
    from jpaged.models.loader import resolve_model_path
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> str:
    """A tiny random Llama folder with the default model's tokenizer: it serves text."""
    from helpers import tiny_model_dir
    return tiny_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_server(tiny_text_model):
    """One OpenAI server over the tiny text model for the whole test run (server, fuzz and
    serving-benchmark tests share it)."""
    from helpers import TINY_SERVER_ARGS
    from jpaged import start_server
    handle = start_server(tiny_text_model, served_model_name="tiny", max_n=4, **TINY_SERVER_ARGS)
    yield handle
    handle.shutdown()


@pytest.fixture(scope="session")
def client(tiny_server):
    import openai
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
