"""Convert a ``transformers``-format Chameleon checkpoint (Chameleon, Anole, Lumina-mGPT) into
one of our model directories: the one place that knows Chameleon's key names and its
vocabulary.

- The config: ``ChameleonConfig`` (``config.json``) -> :class:`ModelConfig` of the chameleon
  family; options our block does not have (biases, another activation, tied embeddings,
  scaled rotary) are refused, never dropped.
- The weights stream shard by shard: each input safetensors shard becomes one output
  shard (``model.safetensors.index.json`` lists them), so a 7B conversion holds one shard
  in memory, not the model twice. Dtypes are kept (bf16 stays bf16). The checkpoint's
  ``model.vqmodel.*`` (the VQ-GAN encoder ``transformers`` keeps) is skipped: the image
  tokenizer comes whole (encoder and decoder) from Meta's ``vqgan.ckpt``.
- The vocabulary: Chameleon's own ids, read from the ``vocabulary_map`` (or the tokenizer's
  vocab) exactly as Chameleon's ``VocabInfo`` reads them: ``<s>``, ``</s>``, ``<pad>``,
  ``<racm3:break>`` (begin image), ``<eoss>`` (end image); the image ids are the entries
  named ``IMGIMG...``, whose letters spell the VQ code (A=0 ... J=9), so code order
  differs from id order; every other ``<...>`` entry is reserved (never generated as text).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cm3leon.config import ModelConfig, load_json, save_json
from cm3leon.model.io import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, check_state_dict, write_index
from cm3leon.model.transformer import Transformer
from cm3leon.safetensors_io import write_safetensors
from cm3leon.vocab import IdTable, Vocab

log = logging.getLogger(__name__)

IMAGE_PREFIX = "IMGIMG"
SKIPPED_PREFIXES = ("model.vqmodel.",)  # the VQ-GAN encoder: the image tokenizer is converted from vqgan.ckpt
_LAYER_KEYS = {
    "input_layernorm.weight": "ln1.weight",
    "post_attention_layernorm.weight": "ln2.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.q_norm.bias": "attn.q_norm.bias",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "self_attn.k_norm.bias": "attn.k_norm.bias",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


# ---- config ------------------------------------------------------------------------
def model_config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """The chameleon-family :class:`ModelConfig` of a ``ChameleonConfig`` dict (``config.json``)."""
    if d.get("model_type") != "chameleon":
        raise ValueError(f"config.json has model_type={d.get('model_type')!r}; expected a 'chameleon' checkpoint "
                         "(Chameleon, Anole or Lumina-mGPT in transformers format)")
    refusals = []
    for key, off in (("attention_bias", False), ("mlp_bias", False), ("tie_word_embeddings", False)):
        if d.get(key, off) not in (off, None):
            refusals.append(f"{key}={d[key]!r}")
    if d.get("hidden_act", "silu") != "silu":
        refusals.append(f"hidden_act={d['hidden_act']!r}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refusals.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}")
    if refusals:
        raise ValueError("this checkpoint uses options the chameleon block does not have: " + ", ".join(refusals)
                         + " (supported: no biases, silu, an untied head, plain rotary positions)")
    n_heads = int(d.get("num_attention_heads", 32))
    n_kv = d.get("num_key_value_heads")
    return ModelConfig(
        vocab_size=int(d.get("vocab_size", 65536)),
        d_model=int(d.get("hidden_size", 4096)),
        n_layers=int(d.get("num_hidden_layers", 32)),
        n_heads=n_heads,
        d_ff=int(d.get("intermediate_size", 11008)),
        max_seq_len=int(d.get("max_position_embeddings", 4096)),
        activation="silu",
        init_std=float(d.get("initializer_range", 0.02)),
        family="chameleon",
        n_kv_heads=None if n_kv in (None, n_heads) else int(n_kv),
        rms_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        swin_norm=bool(d.get("swin_norm", False)),
    )


# ---- weights -----------------------------------------------------------------------
def our_key(hf_key: str) -> str | None:
    """Our name of a Chameleon checkpoint key; None for keys that are skipped (the VQ-GAN encoder).
    Raises on a key this converter does not know."""
    if hf_key.startswith(SKIPPED_PREFIXES):
        return None
    fixed = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "ln_f.weight",
             "lm_head.weight": "lm_head.weight"}
    if hf_key in fixed:
        return fixed[hf_key]
    parts = hf_key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_KEYS:
        return f"blocks.{parts[2]}.{_LAYER_KEYS[parts[3]]}"
    raise ValueError(f"unknown Chameleon checkpoint key {hf_key!r}; this converter maps "
                     "model.embed_tokens, model.layers.*, model.norm, lm_head and skips model.vqmodel")


def convert_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (same tensors, renamed) of (part of) a Chameleon state dict."""
    out = {}
    for k, v in hf_state.items():
        ours = our_key(k)
        if ours is not None:
            out[ours] = v
    return out


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's safetensors shards (from its index) or its single ``model.safetensors``."""
    index = hf_dir / WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = load_json(index).get("weight_map") or {}
        return [hf_dir / f for f in sorted(set(weight_map.values()))]
    single = hf_dir / WEIGHTS_NAME
    if single.exists():
        return [single]
    bins = sorted(hf_dir.glob("*.bin"))
    hint = " (it holds .bin files: re-save it with save_pretrained(safe_serialization=True))" if bins else ""
    raise FileNotFoundError(f"{hf_dir} has neither {WEIGHTS_INDEX_NAME} nor {WEIGHTS_NAME}{hint}")


def convert_weights(hf_dir: str | Path, out_dir: str | Path, cfg: ModelConfig) -> list[str]:
    """Stream the checkpoint's shards into ``out_dir`` (one output shard per input shard), checking
    every key and shape against ``cfg``; returns the written file names."""
    from safetensors import safe_open

    hf_dir, out = Path(hf_dir), Path(out_dir)
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    files = hf_weight_files(hf_dir)
    weight_map: dict[str, str] = {}
    shapes: dict[str, torch.Tensor] = {}
    written = []
    for i, path in enumerate(files):
        name = WEIGHTS_NAME if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                ours = our_key(k)
                if ours is None:
                    continue
                t = f.get_tensor(k)
                if ours in expected and tuple(t.shape) != tuple(expected[ours].shape):
                    raise ValueError(f"{path.name}: {k} has shape {tuple(t.shape)}, the config implies "
                                     f"{tuple(expected[ours].shape)}; config.json and the weights disagree")
                shard[ours] = t.contiguous()
                shapes[ours] = torch.empty(t.shape, device="meta")
                weight_map[ours] = name
        if shard:  # a shard of VQ-GAN encoder weights only has nothing of ours
            write_safetensors(shard, out / name, what=f"the converted weights ({name})",
                              metadata={"format": "pt", "producer": "cm3leon convert chameleon"})
            written.append(name)
            log.info("converted %s -> %s (%d tensors)", path.name, name, len(shard))
        del shard
    check_state_dict(expected, shapes, source=str(hf_dir))
    if len(files) > 1:
        write_index(out, weight_map)
    return written


# ---- vocabulary --------------------------------------------------------------------
def image_code(name: str) -> int:
    """The VQ code an ``IMGIMG...`` token name spells (letters A..J are digits, the last letter ends it)."""
    return int("".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len(IMAGE_PREFIX):-1]))


def vocabulary_map(hf_dir: Path, hf_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Token name -> id: the config's ``vocabulary_map``, else ``tokenizer.json``'s vocab and added tokens."""
    vm = hf_cfg.get("vocabulary_map")
    if vm:
        return {str(k): int(v) for k, v in vm.items()}
    tok = load_json(hf_dir / "tokenizer.json")
    vocab = dict((tok.get("model") or {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens") or []})
    if not vocab:
        raise ValueError(f"{hf_dir}: neither config.json's vocabulary_map nor tokenizer.json's vocab names the ids")
    return {str(k): int(v) for k, v in vocab.items()}


def id_table(vocab_map: Mapping[str, int], size: int) -> IdTable:
    """Chameleon's id layout as an :class:`IdTable` (the names of Chameleon's ``VocabInfo``)."""
    names = {"doc_start": "<s>", "end_text": "</s>", "pad": "<pad>", "begin_image": "<racm3:break>",
             "end_image": "<eoss>"}
    missing = [n for n in names.values() if n not in vocab_map]
    if missing:
        raise ValueError(f"the tokenizer has no {missing} entries; is this a Chameleon-family checkpoint?")
    images = {image_code(n): i for n, i in vocab_map.items() if n.startswith(IMAGE_PREFIX)}
    if not images or sorted(images) != list(range(len(images))):
        raise ValueError(f"the tokenizer's {IMAGE_PREFIX}... entries do not spell the codes 0..{len(images) - 1}")
    controls = {vocab_map[n] for n in names.values()}
    image_ids = set(images.values())
    reserved = sorted(i for n, i in vocab_map.items()
                      if n.startswith("<") and n != "<" and i not in controls and i not in image_ids and i < size)
    return IdTable(size=size, image=tuple(images[c] for c in range(len(images))), reserved=tuple(reserved),
                   **{k: vocab_map[n] for k, n in names.items()})


def write_model(hf_dir: str | Path, out_dir: str | Path, *, image_seq_len: int) -> tuple[ModelConfig, Vocab]:
    """Write ``config.json``, the weights and ``vocab.json`` of the converted decoder into ``out_dir``."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_cfg = load_json(hf_dir / CONFIG_NAME)
    cfg = model_config_from_hf(hf_cfg)
    vocab = Vocab.from_table(id_table(vocabulary_map(hf_dir, hf_cfg), cfg.vocab_size), image_seq_len)
    out.mkdir(parents=True, exist_ok=True)
    convert_weights(hf_dir, out, cfg)
    save_json(cfg, out / CONFIG_NAME)
    save_json(vocab.to_dict(), out / "vocab.json")
    return cfg, vocab
