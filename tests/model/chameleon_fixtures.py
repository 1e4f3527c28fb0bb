"""A tiny transformers Chameleon checkpoint with its tokenizer and a taming-format VQ-GAN, built in
the test (random weights, nothing downloaded): what `cm3leon convert chameleon` reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

N_CODES = 16  # VQ codebook size
WORDS = [f"w{i}" for i in range(40)]
VQ_YAML = """model:
  params:
    embed_dim: 8
    n_embed: 16
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: 16
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 2]
      num_res_blocks: 1
      attn_resolutions: []
      dropout: 0.0
"""  # 16 px -> 4x4 = 16 image tokens per image


def image_name(code: int) -> str:
    """Chameleon's name of VQ code ``code``: IMGIMG + its digits as letters A..J + Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocab_map() -> dict[str, int]:
    """Chameleon's layout in small: <s> <pad> </s> <unk>, the image entries in shuffled code order,
    <eoss> <racm3:break> <image> <reserved0000>, then words."""
    codes = list(range(N_CODES))
    random.Random(0).shuffle(codes)
    names = ["<s>", "<pad>", "</s>", "<unk>", *[image_name(c) for c in codes],
             "<eoss>", "<racm3:break>", "<image>", "<reserved0000>", *WORDS]
    return {n: i for i, n in enumerate(names)}


def write_tokenizer(path: Path, vm: dict[str, int]) -> None:
    """A WordLevel tokenizer.json over ``vm`` with Chameleon's control tokens as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vm, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(n, special=True) for n in vm if n.startswith("<")])
    path.write_text(tok.to_str())


def hf_config(*, swin_norm: bool, n_kv: int = 4, vocabulary_map: dict[str, int] | None = None):
    """A tiny ChameleonConfig."""
    from transformers import ChameleonConfig

    vm = vocabulary_map or vocab_map()
    return ChameleonConfig(
        vocab_size=len(vm), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=128, swin_norm=swin_norm, vocabulary_map=vm,
        bos_token_id=0, pad_token_id=1, eos_token_id=2,
        vq_config=dict(embed_dim=8, num_embeddings=N_CODES, latent_channels=32, resolution=16, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1),
    )


def build_checkpoint(d: Path, *, swin_norm: bool = False, n_kv: int = 4, seed: int = 0,
                     shard_size: str | None = "40KB"):
    """Write ``d`` as a transformers Chameleon checkpoint (sharded unless ``shard_size`` is None) with
    tokenizer.json and vqgan.ckpt + vqgan.yaml; returns the HF model (eval, float32)."""
    from transformers import ChameleonForConditionalGeneration

    from cm3leon.tokenize.image_vq import ImageTokenizer
    from cm3leon.tokenize.image_vq_convert import read_config

    torch.manual_seed(seed)
    vm = vocab_map()
    hf = ChameleonForConditionalGeneration(hf_config(swin_norm=swin_norm, n_kv=n_kv, vocabulary_map=vm)).eval()
    with torch.no_grad():  # move every weight off its init (norm scales 1, biases 0) so the mapping is tested
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    kw = {} if shard_size is None else {"max_shard_size": shard_size}
    hf.save_pretrained(d, **kw)
    write_tokenizer(d / "tokenizer.json", vm)
    (d / "vqgan.yaml").write_text(VQ_YAML)
    cfg, _ = read_config(d / "vqgan.yaml")
    vq = ImageTokenizer(cfg)
    with torch.no_grad():
        for p in vq.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.clone() for k, v in vq.state_dict().items()}
    sd["loss.discriminator.weight"] = torch.zeros(1)  # training-only entries the converter drops
    torch.save({"state_dict": sd}, d / "vqgan.ckpt")
    (d / "README.md").write_text(json.dumps({"tiny": True}))
    return hf
