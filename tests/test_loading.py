"""One pipeline loader, one local-path-or-Hub-id rule, structured errors (issue 34, item 4)."""
from __future__ import annotations

import pickle

import pytest

from loldu_sd.io import LoLDUFormatError, read_adapter_file


def test_format_errors_carry_path_and_reason(tmp_path):
    """Callers show `reason` (the studio hides server paths) without editing the message text."""
    bad = tmp_path / "adapter.safetensors"
    bad.write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(LoLDUFormatError) as info:
        read_adapter_file(bad)
    err = info.value
    assert err.path == str(bad) and str(err) == f"{bad}: {err.reason}" and str(bad) not in err.reason
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason) == (err.path, err.reason)
