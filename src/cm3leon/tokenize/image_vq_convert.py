"""Load released VQ-GAN weights into :class:`ImageTokenizer`: the one place that knows
other projects' key names and config formats.

Sources (``src``):

* ``"taming"``: taming-transformers ``VQModel`` checkpoints (``.ckpt`` with a
  ``state_dict``); keys already match ours. Training-only entries (``loss.*``: the
  discriminator and LPIPS; ``quantize.used``) are dropped.
* ``"chameleon"``: Meta's Chameleon release (``tokenizer/vqgan.ckpt`` + ``vqgan.yaml``),
  which is taming's layout too.
* ``"hf_chameleon"``: transformers' ``ChameleonVQVAE`` weights (``model.vqmodel.*`` inside a
  ``ChameleonForConditionalGeneration`` checkpoint, or bare). HF keeps only the encoder,
  quantizer and ``quant_conv``/``post_quant_conv``: the result can ``encode`` but its
  decoder stays randomly initialized (a warning says so).

Checkpoints are read with ``torch.load(map_location="cpu", weights_only=True)`` (never a
full unpickle) or from safetensors, and written back as safetensors.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cm3leon.tokenize.image_vq import (
    KIND,
    ImageTokenizer,
    VQConfig,
    load_state_dict_strict,
    load_vq_config,
    read_safetensors,
)

logger = logging.getLogger(__name__)

SOURCES = ("taming", "chameleon", "hf_chameleon")
_HF_PREFIXES = ("model.vqmodel.", "vqmodel.")


# ---- state dicts -------------------------------------------------------------------
def convert_state_dict(sd: Mapping[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    """Rename/drop keys of a ``src`` state dict into :class:`ImageTokenizer`'s layout."""
    if src not in SOURCES:
        raise ValueError(f"unknown checkpoint source {src!r}; choose one of {SOURCES}")
    if any(k.startswith("quantize.embed.") or k.startswith("quantize.proj.") for k in sd):
        raise ValueError("this checkpoint uses taming's GumbelQuantize (quantize.proj/quantize.embed), "
                         "which is not supported; use a VectorQuantizer (quantize.embedding) model")
    out: dict[str, torch.Tensor] = {}
    if src in ("taming", "chameleon"):
        for k, v in sd.items():
            if k.startswith("loss.") or k == "quantize.used":
                continue  # discriminator / LPIPS / index remap: training-only
            out[k] = v
    else:  # hf_chameleon
        prefixed = any(k.startswith(_HF_PREFIXES) for k in sd)
        for k, v in sd.items():
            if prefixed:
                p = next((p for p in _HF_PREFIXES if k.startswith(p)), None)
                if p is None:
                    continue  # the language model's weights
                k = k[len(p):]
            out[k] = v
    return out


def detect_source(sd: Mapping[str, torch.Tensor]) -> str:
    """Guess ``src`` from key names: HF prefixes or a missing decoder mean ``hf_chameleon``."""
    if any(k.startswith(_HF_PREFIXES) for k in sd):
        return "hf_chameleon"
    if not any(k.startswith("decoder.") for k in sd) and any(k.startswith("encoder.") for k in sd):
        return "hf_chameleon"
    return "taming"


def load_converted(
    model: ImageTokenizer, sd: Mapping[str, torch.Tensor], *, src: str, source: str = "checkpoint"
) -> None:
    """Load a ``src`` state dict into ``model`` strictly (the decoder may be absent for ``hf_chameleon``)."""
    conv = convert_state_dict(sd, src)
    if src == "hf_chameleon":
        own = model.state_dict()
        missing_dec = {k for k in own if k.startswith("decoder.") and k not in conv}
        if missing_dec:
            logger.warning(
                "%s has no decoder weights (transformers keeps only Chameleon's encoder): the tokenizer can "
                "encode, but decoded images come from a random decoder; convert Meta's vqgan.ckpt for decoding",
                source,
            )
            conv = {**conv, **{k: own[k] for k in missing_dec}}
    load_state_dict_strict(model, conv, source=source)


# ---- configs -----------------------------------------------------------------------
def config_from_taming(params: Mapping[str, Any]) -> VQConfig:
    """VQConfig from a taming/Chameleon yaml's ``model.params`` (``ddconfig``, ``n_embed``, ``embed_dim``)."""
    if "ddconfig" not in params:
        raise ValueError("taming config has no model.params.ddconfig")
    dd = params["ddconfig"]
    if dd.get("double_z", False):
        raise ValueError("ddconfig.double_z=true is a KL autoencoder, not a VQ model")
    if dd.get("attn_type", "vanilla") not in ("vanilla", None):
        raise ValueError(f"unsupported attn_type {dd.get('attn_type')!r} (only 'vanilla')")
    return VQConfig(
        resolution=int(dd["resolution"]),
        in_channels=int(dd.get("in_channels", 3)),
        out_channels=int(dd.get("out_ch", 3)),
        ch=int(dd["ch"]),
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
        mid_attn=True,
        z_channels=int(dd["z_channels"]),
        embed_dim=int(params["embed_dim"]),
        codebook_size=int(params["n_embed"]),
        dropout=float(dd.get("dropout", 0.0)),
    )


def config_from_hf_chameleon(vq: Mapping[str, Any]) -> VQConfig:
    """VQConfig from a transformers ``ChameleonVQVAEConfig`` (as a dict)."""
    if vq.get("double_latent", False):
        raise ValueError("ChameleonVQVAEConfig.double_latent=true is not supported")
    attn_type = vq.get("attn_type", "vanilla")
    return VQConfig(
        resolution=int(vq.get("resolution", 512)),
        in_channels=int(vq.get("in_channels", 3)),
        out_channels=int(vq.get("in_channels", 3)),
        ch=int(vq.get("base_channels", 128)),
        ch_mult=tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4))),
        num_res_blocks=int(vq.get("num_res_blocks", 2)),
        attn_resolutions=tuple(vq.get("attn_resolutions") or ()) if attn_type == "vanilla" else (),
        mid_attn=attn_type == "vanilla",
        z_channels=int(vq.get("latent_channels", 256)),
        embed_dim=int(vq.get("embed_dim", 256)),
        codebook_size=int(vq.get("num_embeddings", 8192)),
        dropout=float(vq.get("dropout", 0.0)),
    )


def read_config(path: str | Path) -> tuple[VQConfig, str | None]:
    """A VQConfig from a taming/Chameleon ``.yaml``, an HF Chameleon ``config.json`` or our
    own ``config.json``; also returns the source it implies (None if unknown)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML ({e})") from e
        try:
            params = raw["model"]["params"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a taming/Chameleon VQ config (no model.params)") from e
        return config_from_taming(params), "taming"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if raw.get("kind") == KIND:
        return load_vq_config(path), None
    if "vq_config" in raw:  # a full ChameleonConfig
        return config_from_hf_chameleon(raw["vq_config"]), "hf_chameleon"
    if raw.get("model_type") == "chameleon_vqgan":
        return config_from_hf_chameleon(raw), "hf_chameleon"
    raise ValueError(
        f"{path}: unrecognized config (expected a taming/Chameleon .yaml, a transformers Chameleon "
        "config.json, or a cm3leon image tokenizer config.json)"
    )


# ---- files -------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.ckpt``/``.pt``/``.pth``/``.bin`` (weights-only unpickling) or ``.safetensors``
    file; a Lightning ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects beyond tensors, which weights-only loading refuses ({e}). "
            "In an environment you trust, extract the weights first: "
            "torch.save(torch.load(p, weights_only=False)['state_dict'], 'weights.pt')"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} could not be read as a torch checkpoint ({e}); it is corrupt or truncated") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return obj


def convert_checkpoint(
    ckpt: str | Path, config: str | Path, out_dir: str | Path, *, src: str | None = None
) -> ImageTokenizer:
    """Read released weights + their config, load them strictly, write ``out_dir`` in our format."""
    cfg, implied = read_config(config)
    sd = read_checkpoint(ckpt)
    src = src or implied or detect_source(sd)
    model = ImageTokenizer(cfg)
    load_converted(model, sd, src=src, source=str(ckpt))
    model.save_pretrained(out_dir)
    logger.info("converted %s (%s) -> %s: %d tokens/image, %d codes", ckpt, src, out_dir,
                model.tokens_per_image, model.codebook_size)
    return model.eval()
