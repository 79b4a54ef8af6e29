"""Resumable checkpoints: atomic checkpoint-N folders holding the adapter, optimizer and RNG states.

Nothing in a checkpoint is a pickle: tensors go to safetensors files, everything else to JSON, so resuming from a
checkpoint someone else crafted cannot run code. A folder holding a pickle file is refused before anything is read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import LoLDUConfig
from ..io import layer_values, loldu_state_dict, parse_metadata, read_adapter_file
from ..model import loldu_layers, loldu_value_problem
from ..naming import checkpoint_prefixes
from .errors import TrainingError, TrainingInputError, first_line

logger = logging.getLogger(__name__)


LOCK_NAME = ".loldu-train.lock"  # host and pid of the run writing the output folder
STATE_NAME = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer", "scheduler.json"  # optimizer.safetensors + optimizer.json
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, torch.save's zip container


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


def _lock_owner_alive(owner: str) -> bool:
    """Whether the 'host pid' that wrote a lock file still runs (a lock from another host counts as alive)."""
    host, _, pid = owner.partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _take_lock(path: Path) -> str | None:
    """Create the lock file (O_EXCL); a stale one is taken over. Returns why it cannot be taken, or None."""
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = path.read_text().strip()
            except OSError:
                owner = ""
            if _lock_owner_alive(owner):
                return (f"--output_dir {path.parent}: another training run (host and pid: {owner or '?'}) is writing "
                        f"to it; wait for it, or use another --output_dir (delete {path.name} if no run is left)")
            path.unlink(missing_ok=True)  # its run died without cleaning up
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return None
    return f"--output_dir {path.parent}: could not take {path.name}; try again"


@contextlib.contextmanager
def output_dir_lock(output_dir: Path, accelerator):
    """Hold --output_dir for this run: two runs writing one folder would mix their checkpoints and adapters."""
    from accelerate.utils import broadcast_object_list

    path = Path(output_dir) / LOCK_NAME
    error = _take_lock(path) if accelerator.is_main_process else None
    error = broadcast_object_list([error])[0]
    if error:
        raise TrainingInputError(error)
    try:
        yield
    finally:
        if accelerator.is_main_process:
            path.unlink(missing_ok=True)


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


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None, *,
                    write_adapter: Callable[[Path], object], optimizer, lr_scheduler) -> Path:
    """Write checkpoint-N.tmp-XXXX, then one rename: a kill never leaves a half checkpoint.

    Every process writes its RNG state; the main process calls write_adapter(folder) and writes the optimizer and
    scheduler states. A full disk raises a one-line OSError and leaves the previous checkpoints as they were.
    """
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([secrets.token_hex(4)])[0]  # the same temp name on every process
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{final.name}.tmp-{token}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        write_rng_state(tmp, accelerator)
        if accelerator.is_main_process:
            write_adapter(tmp)
            write_optimizer_state(tmp, optimizer, lr_scheduler, accelerator.scaler)
            (tmp / STATE_NAME).write_text(json.dumps(state))  # last file: marks the checkpoint complete
            _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        last = f"the last checkpoint, {kept[-1]}, is" if kept else "earlier files are"
        raise TrainingError(f"could not write {final} ({e.strerror or e}); {last} untouched: free some space and "
                            "resume with --resume_from_checkpoint latest") from None
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


def refuse_pickles(folder: Path) -> None:
    """TrainingInputError if any file in a checkpoint folder is a pickle (by name or first bytes); nothing unpickled."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        pickled = path.suffix.lower() in PICKLE_SUFFIXES
        if not pickled and path.suffix.lower() not in (".json", ".safetensors"):
            with open(path, "rb") as f:
                pickled = f.read(4).startswith(PICKLE_MAGIC)
        if pickled:
            raise TrainingInputError(
                f"--resume_from_checkpoint {folder}: holds {path.relative_to(folder)}, a pickle file, which could run "
                "code when loaded; loldu-sd never unpickles. Resume from a checkpoint written by this version of "
                "loldu-sd, or start a new run")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def write_rng_state(folder: Path, accelerator) -> None:
    """This process's RNG states (python, numpy, torch CPU and CUDA) and accelerate's micro-step counter."""
    name = f"random_states_{accelerator.process_index}"
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(folder / f"{name}.safetensors"))
    _write_json(folder / f"{name}.json", {"step": accelerator.step, "python": [version, list(words), gauss],
                                          "numpy": [kind, keys.tolist(), pos, has_gauss, cached]})


def load_rng_state(folder: Path, accelerator) -> None:
    """Restore what write_rng_state wrote for this process."""
    name = f"random_states_{accelerator.process_index}"
    if not (folder / f"{name}.json").is_file():
        raise TrainingInputError(f"--resume_from_checkpoint {folder}: no {name}.json; it was saved by fewer processes "
                                 "than this run has: resume with the same number of processes")
    tensors, state = load_file(str(folder / f"{name}.safetensors")), json.loads((folder / f"{name}.json").read_text())
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    accelerator.step = state["step"]


def write_optimizer_state(folder: Path, optimizer, lr_scheduler, scaler=None) -> None:
    """Optimizer tensors to optimizer.safetensors, its settings and the scheduler (and fp16 scaler) state to JSON."""
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()
               if torch.is_tensor(v)}
    others = {str(i): {k: v for k, v in s.items() if not torch.is_tensor(v)} for i, s in state["state"].items()}
    save_file(tensors, str(folder / f"{OPTIMIZER_NAME}.safetensors"))
    _write_json(folder / f"{OPTIMIZER_NAME}.json", {"param_groups": state["param_groups"], "state": others})
    _write_json(folder / SCHEDULER_NAME, {"scheduler": lr_scheduler.state_dict(),
                                          "scaler": scaler.state_dict() if scaler is not None else None})


def load_optimizer_state(folder: Path, optimizer, lr_scheduler, scaler=None) -> None:
    """Restore what write_optimizer_state wrote (JSON lists become tuples where the optimizer holds tuples)."""
    tensors = load_file(str(folder / f"{OPTIMIZER_NAME}.safetensors"))
    saved = json.loads((folder / f"{OPTIMIZER_NAME}.json").read_text())
    state = {int(i): dict(s) for i, s in saved["state"].items()}
    for key, value in tensors.items():
        i, _, k = key.partition(".")
        state.setdefault(int(i), {})[k] = value
    groups = [{k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in group.items()}
              for group, mine in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    schedules = json.loads((folder / SCHEDULER_NAME).read_text())
    lr_scheduler.load_state_dict(schedules["scheduler"])
    if scaler is not None and schedules["scaler"] is not None:
        scaler.load_state_dict(schedules["scaler"])


def load_checkpoint(folder: Path, accelerator, components: dict[str, torch.nn.Module], config: LoLDUConfig,
                    optimizer, lr_scheduler) -> dict:
    """Resume: check that no file is a pickle, then restore adapter, optimizer, scheduler and RNG; returns the state."""
    from ..diffusers import LOLDU_WEIGHT_NAME

    refuse_pickles(folder)
    try:
        state = json.loads((folder / STATE_NAME).read_text())
        load_adapter_values_(folder / LOLDU_WEIGHT_NAME, components, config)
        load_optimizer_state(folder, optimizer, lr_scheduler, accelerator.scaler)
        load_rng_state(folder, accelerator)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        if isinstance(e, TrainingInputError):
            raise
        raise TrainingInputError(f"--resume_from_checkpoint {folder}: damaged ({type(e).__name__}: {first_line(e)}); "
                                 "resume from an earlier checkpoint (delete this one) or start a new run") from None
    return state


def load_adapter_values_(path: str | Path, components: dict[str, torch.nn.Module], config: LoLDUConfig,
                         adapter_name: str = "default") -> None:
    """Copy z and sigma from an adapter file into the adapter being trained (resume); the layout must match."""
    tensors, meta = read_adapter_file(path)
    saved, saved_layers = parse_metadata(path, meta)
    _, layers = loldu_state_dict(components, adapter_name, checkpoint_prefixes(components))  # names as saved
    if saved_layers != layers or saved != config:
        raise TrainingInputError(f"{path}: this checkpoint was trained with other LoLDU flags (--rank, --alpha, "
                                 "--target_modules, --train_text_encoder ...); resume with the same flags")
    with torch.no_grad():
        for comp, module in components.items():
            values = layer_values(tensors, comp, [rank for _, rank in layers[comp]])
            for (_, layer), (z, sigma) in zip(loldu_layers(module), values):
                layer.loldu_adapters[adapter_name].z.copy_(z)
                layer.loldu_adapters[adapter_name].sigma.copy_(sigma)
    for comp, module in components.items():  # a checkpoint written before values were checked may hold NaN
        problem = loldu_value_problem(module, adapter_name)
        if problem:
            raise TrainingInputError(f"{path}: layer {comp}.{problem}; resume from an earlier checkpoint")


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
