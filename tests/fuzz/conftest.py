import pytest

from fuzz.corpus import make_base


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """The small model (and its .pth, state files, logits) every hostile input starts from."""
    return make_base(tmp_path_factory.mktemp("fuzz-base"))
