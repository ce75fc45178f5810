"""Fixtures shared across the suite. Everything runs offline, on the CPU, with Prefect kept out of ~/.prefect."""

import os
import tempfile

# Set before anything imports prefect or transformers: both read their settings at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="alignflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest

SMALL_TEXT = [
    f"{name} lives in {town} and works as a {job}. {name} likes the colour {colour}."
    for name in ("Veltrin Osk", "Marra Quill", "Doben Tay", "Sefa Lorn")
    for town in ("Harrowgate", "Bellmoor", "Quenby")
    for job in ("baker", "pilot", "weaver")
    for colour in ("teal", "amber")
] + [f"{a} plus {b} is {a + b}." for a in range(10) for b in range(10)]


@pytest.fixture(scope="session")
def tokenizer():
    """A small trained byte-level BPE with the project's chat template and special tokens."""
    from tasks.tokenizer import TokenizerConfig, train_tokenizer

    return train_tokenizer(TokenizerConfig(vocab_size=400, min_frequency=1), SMALL_TEXT)


@pytest.fixture
def one_thread():
    """Two cores shared by several processes: a second thread per process spins and makes a step ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the whole session (each harness costs ~11 s), exported to subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):  # 30 s is not enough on two loaded cores
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        yield url
        del os.environ["PREFECT_API_URL"]
