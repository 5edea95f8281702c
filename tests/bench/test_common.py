"""bench.common helpers that validate command-line values."""

import pytest

from trimformer.bench.common import int_list


def test_int_list_parses_and_validates_when_given_a_flag():
    assert int_list("1, 16,,64") == [1, 16, 64]
    assert int_list("0,-2") == [0, -2]  # unvalidated without a flag
    assert int_list("1,8", "--concurrency") == [1, 8]
    for bad in ("", "0,4", "x", "-1"):
        with pytest.raises(ValueError, match="--concurrency takes comma-separated positive integers"):
            int_list(bad, "--concurrency")
