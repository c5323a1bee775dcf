"""Where a model comes from: a bundled alias, a local checkpoint folder or a Hugging Face hub id (the local HF
cache first; offline, a clear error within seconds)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .choices import EMBEDDED_MODELS
from .embedded import embedded_checkpoint
from .errors import HubUnreachableError, UnknownModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(name: str) -> Path:
    """Local folder holding the checkpoint for ``name`` (building or downloading it if needed)."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"Model name must be a non-empty string, got {name!r}. {NAME_HELP}")
    if name in EMBEDDED_MODELS:
        return embedded_checkpoint(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"Folder {path} has no config.json: point at a Hugging Face checkpoint folder "
                                    "(config.json, weights and tokenizer files, as written by save_pretrained).")
        return path
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _HUB_ID.match(name)
    if looks_like_path or not _HUB_ID.match(name):
        raise UnknownModelError(f"Unknown model {name!r}: not a bundled name and no such folder. {NAME_HELP}")
    return _hub_snapshot(name)


NAME_HELP = (f"Use a bundled name ({', '.join(EMBEDDED_MODELS)}), a local checkpoint folder, "
              "or a Hugging Face hub id such as 'meta-llama/Llama-2-7b-hf'.")


_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def _hub_snapshot(repo_id: str) -> Path:
    """Snapshot folder of a hub repo: the local HF cache first, then the hub if it is reachable."""
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline_env or not hub_reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if offline_env else f"{endpoint} cannot be reached (no network?)"
        raise HubUnreachableError(
            f"Cannot load {repo_id!r}: it is not in the local Hugging Face cache and {why}. "
            f"Download it on a machine with access (huggingface-cli download {repo_id} --local-dir DIR), "
            "copy DIR here and pass the folder: load_model('DIR').")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # gated, missing or mistyped repos
        raise UnknownModelError(f"Could not download {repo_id!r} from the hub: {err}. {NAME_HELP}") from err


def hub_reachable(endpoint: str = "https://huggingface.co", timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
