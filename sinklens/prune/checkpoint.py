"""Writing a pruned model as a standard Hugging Face checkpoint, with a sinklens manifest.

The folder holds ``config.json``, ``model.safetensors`` (standard HF key names), the tokenizer files and
``sinklens_manifest.json`` (source model, every active edit with its heads, dims, k, basis and GQA
policy, the Q/K parameters zeroed, the sinklens version). It reloads with
``AutoModelForCausalLM.from_pretrained(folder)`` or ``sinklens.load_model(folder)``.

``gqa="exact"`` pruning of part of a KV group gives the selected query heads private pruned K copies,
which a grouped checkpoint cannot hold. The checkpoint is then written exactly by ungrouping the whole
model: ``num_key_value_heads = num_attention_heads``, every k_proj / v_proj row block repeated once per
query head, and the selected heads' K copies pruned. The manifest records it (``layout: "ungrouped"``).
Nothing is ever approximated.

A pruning with ``fill="mean"`` adds constant biases to the pruned heads' q (and k) projections. The
checkpoint holds them as q_proj / k_proj biases: the config switches the family's attention bias on
(Llama: ``attention_bias=True``), the fill biases are written in the pruned heads' rows and every other
new bias (other rows, v_proj, o_proj) is zero, so plain transformers computes the pruned model as sinklens
does. A temperature is already in the (scaled) live W_Q columns and q bias.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from ..core.edits import active_edits, count_parameters
from ..core.errors import InputError, WriteError
from ..core.files import OWNER_PATTERN, cause, owner_gone, owner_tag
from ..core.loading import model_info
from ..core.qk import drop_mask, head_rows, layout
from ..core.version import __version__
from .pruning import PruneHandle

MANIFEST = "sinklens_manifest.json"


def standard_state_dict(model) -> dict[str, torch.Tensor]:
    """The bridged HF model's tensors under standard HF names (the live tensors, not copies).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.original_model.state_dict(keep_vars=True).items():
        name = key.replace("._original_component", "")
        if name in out and out[name] is not tensor:
            raise RuntimeError(f"Two tensors map to {name}: cannot build a standard state dict.")
        out[name] = tensor
    return out


def _ungroup(model, state: dict[str, torch.Tensor], n_layers: int, group_size: int, d_head: int) -> None:
    """Repeat every k / v row block (and bias) once per query head, in place in ``state``."""
    names = layout(model)
    for layer in range(n_layers):
        for proj in ("k", "v"):
            for part in ("weight", "bias"):
                key = names.checkpoint_key(layer, proj, part)
                if key not in state:
                    continue
                t = state[key].detach()
                blocks = t.reshape(-1, d_head, *t.shape[1:])
                state[key] = blocks.repeat_interleave(group_size, dim=0).reshape(-1, *t.shape[1:]).clone()


def _enable_biases(model, config, state: dict[str, torch.Tensor]) -> None:
    """Switch the config's attention biases on and add zero tensors for every attention bias ``state`` lacks."""
    if not hasattr(config, "attention_bias"):
        raise InputError(f"fill='mean' needs q/k projection biases, which a {config.model_type} checkpoint cannot "
                         "switch on (its config has no attention_bias): save a fill='zero' pruning instead.")
    config.attention_bias = True
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for name, tensor in shapes.items():
        if name.endswith(".bias") and name not in state:
            state[name] = torch.zeros(tensor.shape, dtype=dtype, device=device)


def _add_rows(state: dict[str, torch.Tensor], key: str, rows: slice, value: torch.Tensor) -> None:
    """state[key][rows] += value, on a copy (the state's tensors may be the live ones)."""
    tensor = state[key].detach().clone()
    tensor[rows] = (tensor[rows].float() + value.to(tensor.device)).to(tensor.dtype)
    state[key] = tensor


def checkpoint_params_zeroed(model) -> dict:
    """Q/K (and o_proj, for removed heads) weights the checkpoint of the model's active edits zeroes.

    Args:
        model: a bridge with active edits (:func:`sinklens.apply_pruning`, :func:`sinklens.apply_head_removal`).
    """
    info = model_info(model)
    edits = active_edits(model)
    ungrouped = info.group_size > 1 and any(isinstance(e, PruneHandle) and e.plan.k_copies for e in edits)
    dh, full, gs = info.d_head, info.d_model, info.group_size
    q = k = o = 0
    for edit in edits:
        if isinstance(edit, PruneHandle):
            plan = edit.plan
            q += sum(dh * (full - d.numel()) for d in plan.q_edits.values())
            k += sum(dh * (full - d.numel()) for d in plan.k_copies.values())
            k += sum(dh * (full - d.numel()) * (gs if ungrouped else 1) for d in plan.k_edits.values())
        else:
            o += edit.params_zeroed()["total"]
    total = count_parameters(model)
    extra = 2 * info.n_layers * (info.n_heads - info.n_kv_heads) * dh * full if ungrouped else 0
    return {"q": q, "k": k, "o": o, "total": q + k + o, "model_params": total, "share": (q + k + o) / total,
            "layout": "ungrouped" if ungrouped else "grouped", "checkpoint_params": total + extra}


def save_pruned(model, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the model with its active edits (apply_pruning / apply_head_removal) as an HF checkpoint.

    Refuses a model without active edits, and a non-empty folder unless ``overwrite``. Returns the folder.
    The checkpoint is written into a temporary folder beside ``folder`` and renamed into place, so a read-only
    or full destination raises :class:`~sinklens.core.errors.WriteError` (the folder and the cause) whichever file
    failed (weights, config, tokenizer, manifest) and leaves nothing half-written (an earlier checkpoint there stays
    as it was); ``overwrite=True`` replaces the folder's whole content, so no file of an older checkpoint (e.g. a
    stale shard index) survives next to the new one. The temporary folder's name carries the writing process
    (host, boot, pid, start time): a save that was killed (SIGKILL) leaves it behind, and the next save into the
    same parent folder removes it once that process has ended (a concurrent save keeps its own).
    The manifest lists every edit's record (for a pruning: the fields of its
    :class:`~sinklens.prune.spec.PruneSpec`, which ``PruneSpec.from_dict`` reads back, and its kept dims).

    Args:
        model: a bridge from :func:`sinklens.load_model` with active edits.
        folder: where to write (created; must be empty unless ``overwrite``).
        overwrite: replace a non-empty folder (one without subfolders: a checkpoint folder) and all its files.
    """
    edits = active_edits(model)
    if not edits:
        raise InputError("The model has no active pruning or head removal: apply one first "
                         "(handle = sinklens.apply_pruning(...)), then save_pruned(model, folder).")
    folder = Path(folder).expanduser().absolute()
    _check_destination(folder, overwrite)
    remove_leftovers(folder.parent)
    staging = _staging_folder(folder)
    try:
        _write(model, edits, staging)
    except BaseException as err:  # whatever failed (an interrupt too), no partial folder stays behind
        shutil.rmtree(staging, ignore_errors=True)
        if _write_failure(err):
            raise WriteError(f"Writing the checkpoint for {folder} failed ({cause(err)}): nothing was written there "
                             "(the partial files were removed; an earlier checkpoint there is unchanged). Free disk "
                             "space or pick another folder.") from err
        raise
    _publish(staging, folder)
    return folder


def _write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed file write: an OSError, a safetensors error (the weights), or the plain Exception
    the Rust ``tokenizers`` library raises for an I/O error ("No space left on device (os error 28)")."""
    if isinstance(err, WriteError):
        return False
    if isinstance(err, (OSError, SafetensorError)):
        return True
    return type(err) is Exception and re.search(r"\(os error \d+\)", str(err)) is not None


def remove_leftovers(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders of :func:`save_pruned` calls in ``parent`` whose process has ended (killed
    mid-save); returns what was removed.

    A ``.<name>.partial-*`` folder is an unfinished checkpoint; a ``.<name>.old-*`` folder the checkpoint an
    overwrite replaced, removed only once ``<name>`` exists again (before that it may be the only copy). Folders of
    a live process (a concurrent save), of another machine on a shared file system, or without the writing
    process in their name (older sinklens versions) are kept.

    Args:
        parent: the folder checkpoints are saved into.
    """
    pattern = re.compile(rf"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<owner>{OWNER_PATTERN})-[a-z0-9_]+")
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink() or not owner_gone(match["owner"]):
            continue
        if match["kind"] == "old" and not (entry.parent / match["name"]).is_dir():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _check_destination(folder: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty folder without ``overwrite``, and (even with it) a folder holding subfolders."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder: pick a folder path for the checkpoint.")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{folder} exists and is not an empty folder: pick a new folder or pass overwrite=True.")
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if subfolders:
        raise InputError(f"{folder} holds folders ({', '.join(subfolders[:5])}), which no checkpoint does: "
                         "overwrite=True replaces a checkpoint folder and every file in it. Pick another folder.")


def _staging_folder(folder: Path) -> Path:
    """A new empty folder beside ``folder`` to write into (same file system, so the final rename is atomic)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-{owner_tag()}-", dir=folder.parent))
    except OSError as err:
        raise WriteError(f"Cannot write a checkpoint into {folder.parent} ({err.strerror or err}): the folder is "
                         "read-only or cannot be created. Pick a writable folder.") from err


def _publish(staging: Path, folder: Path) -> None:
    """Rename the finished ``staging`` folder to ``folder``; an earlier folder there is moved aside, then deleted."""
    old = None
    try:
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-{owner_tag()}-", dir=folder.parent))
            os.replace(folder, old)
        os.replace(staging, folder)
    except OSError as err:
        if old is not None and not folder.exists():
            os.replace(old, folder)  # put the earlier checkpoint back
        shutil.rmtree(staging, ignore_errors=True)
        raise WriteError(f"Cannot move the new checkpoint into {folder} ({cause(err)}): nothing was changed "
                         "there.") from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(model, edits: list, folder: Path) -> None:
    """The checkpoint of ``edits`` written into the existing empty ``folder`` (manifest last)."""
    info = model_info(model)
    counts = checkpoint_params_zeroed(model)
    state = {name: t.detach() for name, t in standard_state_dict(model).items()}
    for layer in range(info.n_layers):  # fused q/k/v the bridge splits into copies: rebuilt from the live split
        state.update(layout(model).checkpoint_tensors(model, layer))
    config = copy.deepcopy(model.original_model.config)
    plans = [edit.plan for edit in edits if isinstance(edit, PruneHandle)]
    biased = any(plan.q_bias or plan.k_bias or plan.k_copy_bias for plan in plans)
    if biased:
        _enable_biases(model, config, state)
        for plan in plans:
            for (layer, head), value in plan.q_bias.items():
                _add_rows(state, layout(model).checkpoint_key(layer, "q", "bias"), head_rows(info, head), value)
            for (layer, group), value in plan.k_bias.items():
                _add_rows(state, layout(model).checkpoint_key(layer, "k", "bias"), head_rows(info, group), value)
    if counts["layout"] == "ungrouped":
        _ungroup(model, state, info.n_layers, info.group_size, info.d_head)
        config.num_key_value_heads = config.num_attention_heads
        for plan in plans:
            for (layer, head), keep in plan.k_copies.items():
                weight = state[layout(model).checkpoint_key(layer, "k")]
                weight[head_rows(info, head), drop_mask(keep, info.d_model, weight.device)] = 0
            for (layer, head), value in plan.k_copy_bias.items():  # ungrouped: K rows of query head ``head``
                _add_rows(state, layout(model).checkpoint_key(layer, "k", "bias"), head_rows(info, head), value)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    expected = set(fresh.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise RuntimeError(f"Cannot map the bridged model to standard HF names: missing {missing[:5]}.")
    fresh.load_state_dict({name: state[name].contiguous() for name in expected}, strict=True, assign=True)
    live: dict[str, torch.Tensor] = {}  # standard name -> first live buffer of that name
    for live_name, live_buffer in model.original_model.named_buffers():
        live.setdefault(live_name.replace("._original_component", ""), live_buffer)
    for name, buffer in list(fresh.named_buffers()):  # non-persistent buffers (rotary inv_freq) from the live model
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            source = live.get(name)
            if source is None:
                raise RuntimeError(f"No live buffer for {name}.")
            fresh.get_submodule(module_name)._buffers[attr] = source.detach().clone()
    fresh.tie_weights()
    fresh.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    manifest = {
        "format": 1,
        "sinklens_version": __version__,
        "source_model": {"name": info.name, **info.as_dict()},
        "layout": counts["layout"],
        "num_key_value_heads": {"source": info.n_kv_heads,
                                "checkpoint": info.n_heads if counts["layout"] == "ungrouped" else info.n_kv_heads},
        "ungrouped_note": ("gqa='exact' pruned part of a KV group: every k_proj/v_proj row block was repeated per "
                           "query head (exact, no approximation)") if counts["layout"] == "ungrouped" else None,
        "attention_bias": ("fill='mean' biases written as q_proj/k_proj biases; every other attention bias is zero"
                           if biased else None),
        "edits": [edit.as_dict() for edit in edits],
        "params_zeroed": counts,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def read_manifest(folder: str | os.PathLike) -> dict:
    """The sinklens manifest of a checkpoint written by :func:`save_pruned`.

    Args:
        folder: the checkpoint folder.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path} does not exist: is {folder} a checkpoint written by sinklens.save_pruned?")
    return json.loads(path.read_text(encoding="utf-8"))
