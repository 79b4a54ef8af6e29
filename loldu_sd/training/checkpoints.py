"""Resumable checkpoints: atomic checkpoint-N folders holding the adapter, optimizer and RNG states."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from ..config import LoLDUConfig
from ..io import layer_values, loldu_state_dict, read_adapter_file
from ..naming import checkpoint_prefixes
from ..model import loldu_layers
from .errors import TrainingInputError

logger = logging.getLogger(__name__)


STATE_NAME = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint-N folders, oldest first; temp folders of interrupted saves are ignored."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | Path, spec: str) -> Path | None:
    """The checkpoint `spec` names: 'latest', a path, or a folder name inside output_dir (None if there is none)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(spec), Path(output_dir) / spec):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def clean_interrupted_saves(output_dir: Path) -> None:
    """Remove temp folders of killed saves; put back a checkpoint whose replacement was interrupted mid-rename."""
    for path in output_dir.glob("checkpoint-*.*-*"):
        name, _, kind = path.name.partition(".")
        if kind.startswith("old-") and not (output_dir / name).exists():
            path.rename(output_dir / name)
        elif kind.startswith(("tmp-", "old-")):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None = None) -> Path:
    """accelerator.save_state into checkpoint-N.tmp-XXXX, then one rename: a kill never leaves a half checkpoint."""
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([secrets.token_hex(4)])[0]  # the same temp name on every process
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{final.name}.tmp-{token}"
    accelerator.save_state(str(tmp))  # every process: RNG states; main: adapter (hook), optimizer, scheduler
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(state))  # last file: marks the checkpoint complete
        _fsync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = final.rename(output_dir / f"{final.name}.old-{token}") if final.exists() else None
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
        checkpoints = list_checkpoints(output_dir)
        for stale in checkpoints[: max(0, len(checkpoints) - (total_limit or len(checkpoints)))]:
            shutil.rmtree(stale)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def load_adapter_values_(path: str | Path, components: dict[str, torch.nn.Module], config: LoLDUConfig,
                         adapter_name: str = "default") -> None:
    """Copy z and sigma from an adapter file into the adapter being trained (resume); the layout must match."""
    tensors, meta = read_adapter_file(path)
    _, layers = loldu_state_dict(components, adapter_name, checkpoint_prefixes(components))  # names as saved
    if json.loads(meta["layers"]) != layers or LoLDUConfig.from_dict(json.loads(meta["config"])) != config:
        raise TrainingInputError(f"{path}: this checkpoint was trained with other LoLDU flags (--rank, --alpha, "
                                 "--target_modules, --train_text_encoder ...); resume with the same flags")
    with torch.no_grad():
        for comp, module in components.items():
            values = layer_values(tensors, comp, [rank for _, rank in layers[comp]])
            for (_, layer), (z, sigma) in zip(loldu_layers(module), values):
                layer.loldu_adapters[adapter_name].z.copy_(z)
                layer.loldu_adapters[adapter_name].sigma.copy_(sigma)


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Short sha256 of an adapter's trained values (z and sigma), to compare processes and files."""
    keys = sorted(k for k in tensors if k.endswith(("loldu.z", "loldu.sigma")))
    flat = torch.cat([tensors[k].detach().float().reshape(-1).cpu() for k in keys])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def rank_digests(accelerator, components: dict[str, torch.nn.Module]) -> list[str]:
    """adapter_digest of every process's adapter (the adapter is kilobytes: gathering all of it is cheap)."""
    tensors, _ = loldu_state_dict(components)
    keys = sorted(k for k in tensors if k.endswith(("loldu.z", "loldu.sigma")))
    sizes = [tensors[k].numel() for k in keys]
    flat = torch.cat([tensors[k].reshape(-1) for k in keys]).to(accelerator.device)
    rows = accelerator.gather(flat).reshape(accelerator.num_processes, -1).cpu()
    return [adapter_digest(dict(zip(keys, row.split(sizes)))) for row in rows]
