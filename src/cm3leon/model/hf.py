"""Export to / import from Hugging Face ``transformers`` OPTForCausalLM (DESIGN.md "Model").

CM3Leon is OPT without biases and without LayerNorm parameters, so it maps onto
``OPTConfig(enable_bias=False, layer_norm_elementwise_affine=False,
do_layer_norm_before=True, tie_word_embeddings=False)`` with identical logits. The one
layout difference is OPT's learned positional embedding, which looks up
``position + 2``: the exported table carries two extra (zero) leading rows. OPT derives
positions from ``attention_mask`` as ``cumsum(mask) - 1`` (pads -> -1 -> row 1), the
same positions our model uses for left-padded batches (:func:`positions_from_valid`).

All key renaming lives in :func:`to_opt_state_dict` / :func:`from_opt_state_dict`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cm3leon.config import ModelConfig
from cm3leon.model.io import check_state_dict, read_safetensors
from cm3leon.model.transformer import Transformer
from cm3leon.vocab import Vocab

if TYPE_CHECKING:
    from transformers import OPTConfig, OPTForCausalLM

log = logging.getLogger(__name__)

OPT_POS_OFFSET = 2  # OPTLearnedPositionalEmbedding looks up position + 2


def to_opt_config(cfg: ModelConfig, vocab: Vocab | None = None) -> OPTConfig:
    """The ``OPTConfig`` describing the same network as ``cfg`` (special ids from ``vocab``)."""
    from transformers import OPTConfig

    if cfg.image_tokens:
        raise ValueError(
            "this model has an image position embedding (ModelConfig.image_tokens > 0), which OPT does not "
            "have; only models without it can be exported to transformers"
        )
    v = vocab or Vocab.paper()  # special ids are the same in every Vocab
    if vocab is not None and vocab.size != cfg.vocab_size:
        raise ValueError(f"vocab.size={vocab.size} does not match ModelConfig.vocab_size={cfg.vocab_size}")
    return OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        ffn_dim=cfg.ffn_dim,
        max_position_embeddings=cfg.max_seq_len,
        do_layer_norm_before=True,
        word_embed_proj_dim=cfg.d_model,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        activation_function=cfg.activation,
        init_std=cfg.init_std,
        enable_bias=False,
        layer_norm_elementwise_affine=False,
        tie_word_embeddings=False,
        pad_token_id=v.pad_id,
        bos_token_id=v.eos_id,  # every document starts with <eos> (paper §2.1)
        eos_token_id=v.eos_id,
    )


def from_opt_config(opt: OPTConfig | dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of an OPT config, refusing features our decoder does not have."""
    d = opt if isinstance(opt, dict) else opt.to_dict()
    if d.get("model_type", "opt") != "opt":
        raise ValueError(f"expected an OPT config (model_type 'opt'), got model_type {d.get('model_type')!r}")
    hidden = d["hidden_size"]
    refusals = []
    if d.get("enable_bias", True):
        refusals.append("enable_bias=True (CM3Leon has no bias terms)")
    if d.get("layer_norm_elementwise_affine", True):
        refusals.append("layer_norm_elementwise_affine=True (CM3Leon LayerNorms have no parameters)")
    if not d.get("do_layer_norm_before", True):
        refusals.append("do_layer_norm_before=False (post-LN; CM3Leon is pre-LN)")
    if d.get("_remove_final_layer_norm", False):
        refusals.append("_remove_final_layer_norm=True (CM3Leon has a final LayerNorm)")
    proj = d.get("word_embed_proj_dim") or hidden
    if proj != hidden:
        refusals.append(f"word_embed_proj_dim={proj} != hidden_size={hidden} (no embedding projections)")
    act = d.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        refusals.append(f"activation_function={act!r} (supported: 'relu', 'gelu')")
    if refusals:
        raise ValueError("this OPT checkpoint cannot be represented by the CM3Leon decoder: " + "; ".join(refusals))
    return ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=hidden,
        n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"],
        d_ff=None if d["ffn_dim"] == 4 * hidden else d["ffn_dim"],
        max_seq_len=d["max_position_embeddings"],
        activation=act,
        init_std=d.get("init_std", ModelConfig.init_std),
    )


def to_opt_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights renamed/reshaped to OPTForCausalLM keys (q/k/v split, position rows offset by 2)."""
    sd = model.state_dict()
    pos = sd["pos_emb.weight"]
    out = {
        "model.decoder.embed_tokens.weight": sd["tok_emb.weight"],
        "model.decoder.embed_positions.weight": torch.cat([pos.new_zeros(OPT_POS_OFFSET, pos.shape[1]), pos]),
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(model.cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.decoder.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].chunk(3, dim=0)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.out_proj.weight"] = sd[src + "attn.out.weight"]
        out[dst + "fc1.weight"] = sd[src + "mlp.fc1.weight"]
        out[dst + "fc2.weight"] = sd[src + "mlp.fc2.weight"]
    return {k: t.contiguous() for k, t in out.items()}


def from_opt_state_dict(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`to_opt_state_dict`; an OPT checkpoint with tied embeddings gets an untied copy."""
    hf = {("model." + k if k.startswith("decoder.") else k): t for k, t in hf.items()}  # OPTModel keys
    expected = to_opt_state_dict_shapes(cfg)
    if "lm_head.weight" not in hf and "model.decoder.embed_tokens.weight" in hf:
        log.info("OPT checkpoint ties lm_head to embed_tokens; importing an untied copy")
        hf = {**hf, "lm_head.weight": hf["model.decoder.embed_tokens.weight"]}
    check_state_dict(expected, hf, source="the OPT checkpoint")
    out = {
        "tok_emb.weight": hf["model.decoder.embed_tokens.weight"],
        "pos_emb.weight": hf["model.decoder.embed_positions.weight"][OPT_POS_OFFSET:],
        "lm_head.weight": hf["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        src, dst = f"model.decoder.layers.{i}.", f"blocks.{i}."
        out[dst + "attn.qkv.weight"] = torch.cat(
            [hf[src + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        out[dst + "attn.out.weight"] = hf[src + "self_attn.out_proj.weight"]
        out[dst + "mlp.fc1.weight"] = hf[src + "fc1.weight"]
        out[dst + "mlp.fc2.weight"] = hf[src + "fc2.weight"]
    return {k: t.contiguous() for k, t in out.items()}


def to_opt_state_dict_shapes(cfg: ModelConfig) -> dict[str, Tensor]:
    """Meta tensors with the shape of every OPT key for ``cfg`` (for strict checks)."""
    with torch.device("meta"):
        return to_opt_state_dict(Transformer(cfg))


def to_hf(model: Transformer, vocab: Vocab | None = None) -> OPTForCausalLM:
    """An in-memory OPTForCausalLM with ``model``'s weights (same device and dtype)."""
    from transformers import OPTForCausalLM

    p = next(model.parameters())
    with torch.device("meta"):
        hf = OPTForCausalLM(to_opt_config(model.cfg, vocab))
    state = {k: t.detach().clone() for k, t in to_opt_state_dict(model).items()}  # no shared storage
    hf.load_state_dict(state, strict=True, assign=True)
    return hf.to(device=p.device, dtype=p.dtype).eval()


def export_hf(model: Transformer, out_dir: str | Path, *, vocab: Vocab | None = None) -> Path:
    """Write ``model`` as a transformers OPTForCausalLM directory (config.json + model.safetensors)."""
    out = Path(out_dir)
    to_hf(model, vocab).save_pretrained(str(out))
    log.info("exported OPTForCausalLM to %s", out)
    return out


def _read_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(hf_dir / shard))
        return state
    raise FileNotFoundError(
        f"no model.safetensors (or model.safetensors.index.json) in {hf_dir}; "
        "only safetensors checkpoints are supported (re-save with save_pretrained)"
    )


def import_hf(hf_dir: str | Path) -> tuple[Transformer, ModelConfig]:
    """Load an OPTForCausalLM directory as our :class:`Transformer` (strict; clear refusals)."""
    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found; expected a transformers model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from e
    cfg = from_opt_config(raw)
    state = from_opt_state_dict(_read_hf_weights(d), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg
