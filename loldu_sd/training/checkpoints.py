"""Resumable checkpoints: atomic checkpoint-N folders holding the adapter, optimizer and RNG states.

Nothing in a checkpoint is a pickle: tensors go to safetensors files, everything else to JSON, so resuming from a
checkpoint someone else crafted cannot run code. A folder holding a pickle file is refused before anything is read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
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

from ..io import LoLDUFormatError, layer_values, loldu_state_dict, parse_metadata, read_adapter_file
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
MAX_JSON_BYTES = 64 * 2**20  # the losses of a few million steps; a crafted global_step of 1e9 cannot fit
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # optimizer tensors shaped like their parameter


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


class _Damaged(ValueError):
    """One problem of one checkpoint file: (file name, what is wrong)."""


def _read_json(path: Path, limit: int = MAX_JSON_BYTES):
    """A checkpoint's JSON file, size-capped and parsed; _Damaged naming it on any problem."""
    try:
        too_big = path.stat().st_size > limit
        value = None if too_big else json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise _Damaged(path.name, f"unreadable ({type(e).__name__}: {first_line(e)})") from None
    if too_big:
        raise _Damaged(path.name, f"over {limit // 2**20} MB")
    return value


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise _Damaged(path.name, f"unreadable ({type(e).__name__}: {first_line(e)})") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_problem(saved, mine, where: str) -> str | None:
    """Why `saved` (from JSON) is not shaped like `mine` (this run's own value), or None: same types, finite numbers."""
    if _is_number(mine):
        ok = _is_number(saved) and math.isfinite(saved) and (isinstance(saved, int) or not isinstance(mine, int))
        return None if ok else f"{where} is {saved!r}, not a finite {type(mine).__name__}"
    if isinstance(mine, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(mine):
            return f"{where} is not a list of {len(mine)}"
        return next((p for i, (a, b) in enumerate(zip(saved, mine)) if (p := _kind_problem(a, b, f"{where}[{i}]"))),
                    None)
    if isinstance(mine, dict):
        if not isinstance(saved, dict) or set(saved) != {str(k) for k in mine}:
            return f"{where} does not have the keys {sorted(map(str, mine))}"
        return next((p for k, v in mine.items() if (p := _kind_problem(saved[str(k)], v, f"{where}.{k}"))), None)
    if mine is None or isinstance(mine, (bool, str)):
        return None if type(saved) is type(mine) or mine is None and saved is None else f"{where} is {saved!r}"
    return None


def _check_state(folder: Path) -> dict:
    """training_state.json: global_step a whole number matching the folder and the losses, losses finite."""
    state = _read_json(folder / STATE_NAME)
    if not isinstance(state, dict):
        raise _Damaged(STATE_NAME, "is not a JSON object")
    step, losses, total = state.get("global_step"), state.get("losses"), state.get("max_train_steps", 0)
    if type(step) is not int or step < 1 or (type(total) is not int or total < 0):
        raise _Damaged(STATE_NAME, f"global_step {step!r} / max_train_steps {total!r} are not whole numbers >= 1")
    named = CHECKPOINT_RE.match(folder.name)
    if named and int(named.group(1)) != step:
        raise _Damaged(STATE_NAME, f"global_step {step} does not match the folder's name")
    if not isinstance(losses, list) or len(losses) != step or not all(
            isinstance(x, list) and len(x) == 2 and type(x[0]) is int and _is_number(x[1]) and math.isfinite(x[1])
            for x in losses):
        raise _Damaged(STATE_NAME, f"losses are not {step} [step, finite loss] pairs, one per step")
    return state


def _check_adapter(path: Path, components: dict[str, torch.nn.Module]
                   ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """z and sigma of every layer, after checking the file against the adapter this run just built."""
    try:
        tensors, meta = read_adapter_file(path)
        _, saved_layers = parse_metadata(path, meta)
    except ValueError as e:
        raise _Damaged(path.name, e.reason if isinstance(e, LoLDUFormatError) else first_line(e)) from None
    mine, layers = loldu_state_dict(components, "default", checkpoint_prefixes(components))  # names as saved
    if saved_layers != layers:  # the flags were compared before loading (args.check_resumable): another base's layers
        raise TrainingInputError(f"{path}: this checkpoint's layers are not this base model's; resume with the "
                                 "--pretrained_model_name_or_path it was trained on")
    for key, expected in mine.items():
        got = tensors.get(key)
        if got is None or got.shape != expected.shape or got.is_floating_point() != expected.is_floating_point():
            raise _Damaged(path.name, f"{key} is missing or not a {expected.dtype} tensor of shape "
                                      f"{tuple(expected.shape)}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise _Damaged(path.name, f"{key} holds NaN/inf values")
    for kind in ("pivots", "fingerprint"):  # the base model and its decomposition must be this run's
        for key in (k for k in mine if k.endswith(f"loldu.{kind}")):
            same = (torch.equal(tensors[key].long(), mine[key].long()) if kind == "pivots"
                    else torch.allclose(tensors[key].float(), mine[key], rtol=1e-3, atol=1e-6))
            if not same:
                raise _Damaged(path.name, f"{key} differs from this base model's (another base, or edited)")
    return {comp: layer_values(tensors, comp, [rank for _, rank in layers[comp]]) for comp in components}


def _check_optimizer(folder: Path, optimizer) -> dict:
    """optimizer.safetensors/.json as a state dict for `optimizer`: groups shaped like its own, moments finite."""
    tensors = _read_tensors(folder / f"{OPTIMIZER_NAME}.safetensors")
    name = f"{OPTIMIZER_NAME}.json"
    saved = _read_json(folder / name)
    mine = optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise _Damaged(name, "is not an optimizer state")
    problem = _kind_problem(saved.get("param_groups"), mine["param_groups"], "param_groups")
    lrs = [g.get("lr") for g in saved["param_groups"]] if not problem else []
    if problem or not all(x >= 0 for x in lrs):  # NaN fails too; 0 is a warm-up's first step
        raise _Damaged(name, problem or f"learning rates {lrs} are not all >= 0")
    # state_dict numbers the parameters 0, 1, ... across the groups, in order
    shapes = dict(enumerate(p.shape for group in optimizer.param_groups for p in group["params"]))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        i, _, k = key.partition(".")
        if not i.isdigit() or int(i) not in shapes or not (value.is_floating_point() or k == "step"):
            raise _Damaged(f"{OPTIMIZER_NAME}.safetensors", f"{key} belongs to no parameter of this run")
        if k in MOMENTS and value.shape != shapes[int(i)] or k == "step" and value.numel() != 1:
            raise _Damaged(f"{OPTIMIZER_NAME}.safetensors", f"{key} has shape {tuple(value.shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all() or k == "step" and float(value) < 0:
            raise _Damaged(f"{OPTIMIZER_NAME}.safetensors", f"{key} holds NaN/inf or negative values")
        state.setdefault(int(i), {})[k] = value
    for i, extra in saved["state"].items():
        if not (i.isdigit() and int(i) in shapes and isinstance(extra, dict)
                and all(_is_number(v) and math.isfinite(v) for v in extra.values())):
            raise _Damaged(name, f"state {i!r} is not numbers of a parameter of this run")
        state.setdefault(int(i), {}).update(extra)
    groups = [{k: tuple(v) if isinstance(m.get(k), tuple) else v for k, v in group.items()}
              for group, m in zip(saved["param_groups"], mine["param_groups"])]
    return {"state": state, "param_groups": groups}


def _check_schedules(folder: Path, lr_scheduler, scaler, step: int) -> dict:
    """scheduler.json: shaped like this run's scheduler (and scaler), its position at global_step."""
    saved = _read_json(folder / SCHEDULER_NAME)
    if not isinstance(saved, dict) or set(saved) != {"scheduler", "scaler"}:
        raise _Damaged(SCHEDULER_NAME, "is not a scheduler state")
    problem = _kind_problem(saved["scheduler"], lr_scheduler.state_dict(), "scheduler")
    if not problem and saved["scheduler"].get("last_epoch", step) != step:
        problem = f"scheduler.last_epoch {saved['scheduler']['last_epoch']} is not global_step {step}"
    if not problem and not all(x > 0 for x in saved["scheduler"].get("base_lrs", [])):
        problem = "scheduler.base_lrs are not all > 0"
    if not problem and scaler is not None and saved["scaler"] is not None:
        problem = _kind_problem(saved["scaler"], scaler.state_dict(), "scaler")
    if problem:
        raise _Damaged(SCHEDULER_NAME, problem)
    return saved


def _check_rng(folder: Path, accelerator) -> tuple:
    """This process's RNG files, each state tried on a throwaway generator first."""
    name = f"random_states_{accelerator.process_index}"
    if not (folder / f"{name}.json").is_file():
        raise TrainingInputError(f"--resume_from_checkpoint {folder}: no {name}.json; it was saved by fewer processes "
                                 "than this run has: resume with the same number of processes")
    tensors, state = _read_tensors(folder / f"{name}.safetensors"), _read_json(folder / f"{name}.json")
    cuda = [f"cuda.{i}" for i in range(len(tensors) - 1)]
    try:
        version, words, gauss = state["python"]
        python = (version, tuple(words), gauss)
        random.Random().setstate(python)
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        np.random.RandomState().set_state(numpy)
        if set(tensors) != {"torch", *cuda} or type(state["step"]) is not int or state["step"] < 0:
            raise ValueError("unexpected entries")
        for key in ("torch", *cuda):
            if tensors[key].dtype != torch.uint8 or tensors[key].ndim != 1:
                raise ValueError(f"{key} is not a byte vector")
        torch.Generator().set_state(tensors["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise _Damaged(f"{name}.json/.safetensors", f"not an RNG state ({first_line(e)})") from None
    return python, numpy, tensors["torch"], [tensors[k] for k in cuda], state["step"]


def load_rng_state(folder: Path, accelerator) -> None:
    """Restore what write_rng_state wrote for this process (checked first)."""
    python, numpy, cpu, cuda, step = _check_rng(folder, accelerator)
    _restore_rng(accelerator, python, numpy, cpu, cuda, step)


def _restore_rng(accelerator, python, numpy, cpu, cuda, step) -> None:
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    accelerator.step = step


def _copy_values(components: dict[str, torch.nn.Module], values: dict, path: Path) -> None:
    """Copy dz and dsigma into this run's adapter; values absurd for their layer are refused and the old ones kept."""
    pairs = [(layer.loldu_adapters["default"], z, sigma) for comp, module in components.items()
             for (_, layer), (z, sigma) in zip(loldu_layers(module), values[comp], strict=True)]
    old = [(a.dz.detach().clone(), a.dsigma.detach().clone()) for a, _, _ in pairs]
    with torch.no_grad():
        for a, z, sigma in pairs:
            a.dz.copy_(z)
            a.dsigma.copy_(sigma)
    problem = next((f"{c}.{p}" for c, m in components.items() if (p := loldu_value_problem(m, "default"))), None)
    if problem:  # the size check needs the layer's base weight: measured in place, then taken back
        with torch.no_grad():
            for (a, _, _), (z, sigma) in zip(pairs, old):
                a.dz.copy_(z)
                a.dsigma.copy_(sigma)
        raise TrainingInputError(f"{path}: layer {problem}; resume from an earlier checkpoint")


def load_checkpoint(folder: Path, accelerator, components: dict[str, torch.nn.Module], optimizer, lr_scheduler
                    ) -> dict:
    """Resume: check every file of the checkpoint (no pickle, every tensor's shape, dtype and finiteness, every state
    field's type and range), then restore adapter, optimizer, scheduler and RNG; returns the training state."""
    from ..io import LOLDU_WEIGHT_NAME

    refuse_pickles(folder)
    try:
        state = _check_state(folder)
        values = _check_adapter(folder / LOLDU_WEIGHT_NAME, components)
        optimizer_state = _check_optimizer(folder, optimizer)
        schedules = _check_schedules(folder, lr_scheduler, accelerator.scaler, state["global_step"])
        rng = _check_rng(folder, accelerator)
    except _Damaged as e:
        file, problem = e.args
        raise TrainingInputError(f"--resume_from_checkpoint {folder}: {file}: {problem}; this checkpoint is damaged "
                                 "or was edited: resume from an earlier one (delete this one) or start a new run"
                                 ) from None
    _copy_values(components, values, folder / LOLDU_WEIGHT_NAME)
    optimizer.load_state_dict(optimizer_state)  # everything checked: from here on nothing is refused
    lr_scheduler.load_state_dict(schedules["scheduler"])
    if accelerator.scaler is not None and schedules["scaler"] is not None:
        accelerator.scaler.load_state_dict(schedules["scaler"])
    _restore_rng(accelerator, *rng)
    return state


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


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Short sha256 of an adapter's trained values (dz and dsigma), to compare processes and files."""
    keys = sorted(k for k in tensors if k.endswith(("loldu.dz", "loldu.dsigma")))
    flat = torch.cat([tensors[k].detach().float().reshape(-1).cpu() for k in keys])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def rank_digests(accelerator, components: dict[str, torch.nn.Module]) -> list[str]:
    """adapter_digest of every process's adapter (the adapter is kilobytes: gathering all of it is cheap)."""
    tensors, _ = loldu_state_dict(components)
    keys = sorted(k for k in tensors if k.endswith(("loldu.dz", "loldu.dsigma")))
    sizes = [tensors[k].numel() for k in keys]
    flat = torch.cat([tensors[k].reshape(-1) for k in keys]).to(accelerator.device)
    rows = accelerator.gather(flat).reshape(accelerator.num_processes, -1).cpu()
    return [adapter_digest(dict(zip(keys, row.split(sizes)))) for row in rows]
