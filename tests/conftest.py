import pytest

import harness


@pytest.fixture(scope="module")
def fake_cuda_env(tmp_path_factory):
    """See harness.fake_cuda_env; skips when the stand-in driver does not build."""
    try:
        return harness.fake_cuda_env(tmp_path_factory.mktemp("fake_cuda"))
    except RuntimeError as e:
        pytest.skip(f"the fake CUDA driver does not build here: {e}")
