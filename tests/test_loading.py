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


@pytest.mark.parametrize("spec, local", [("org/name", False), ("name", False), ("./name", True), ("/abs/x", True),
                                         ("~/x", True), ("a/b/c", True), ("org/name/sub", True)])
def test_one_rule_tells_local_paths_from_hub_ids(spec, local):
    """The adapter resolver, the trainer's flags and the loader all ask looks_local."""
    from loldu_sd.loading import looks_local

    assert looks_local(spec) is local


def test_loader_reads_a_folder_in_the_asked_dtype_and_names_bad_paths(tmp_path):
    """A saved tiny pipeline loads fp32 on CPU with its progress bar off; a missing or non-pipeline folder is a
    PipelineLoadError carrying the path, before diffusers is asked."""
    import torch

    from loldu_sd.loading import PipelineLoadError, load_pipeline
    from loldu_sd.testing import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "tiny", seed=0)
    pipe = load_pipeline(folder)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe._progress_bar_config == {"disable": True}
    assert load_pipeline(folder, dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    for bad, why in ((tmp_path / "missing", "no such folder"), (tmp_path, "not a diffusers pipeline folder")):
        with pytest.raises(PipelineLoadError) as info:
            load_pipeline(bad)
        assert info.value.path == str(bad) and info.value.reason.startswith(why)
