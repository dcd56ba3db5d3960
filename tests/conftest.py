import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One tokenizer/token cache for the whole session (the tokenizer is trained once)."""
    path = str(tmp_path_factory.mktemp("sparsetron-cache"))
    os.environ["SPARSETRON_CACHE"] = path
    return path
