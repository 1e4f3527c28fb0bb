"""Export to / import from transformers OPTForCausalLM: identical logits, exact round trips."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from cm3leon.cli import main as cli_main
from cm3leon.config import ModelConfig
from cm3leon.model.hf import export_hf, import_hf, to_hf
from cm3leon.model.io import load_model, save_model
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.model.transformer import Transformer, positions_from_valid
from cm3leon.vocab import Vocab

VOCAB = Vocab(text_size=60, image_size=32, image_seq_len=8)


def randomized(seed: int = 0, **kw) -> Transformer:
    base = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=40)
    base.update(kw)
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=VOCAB.size, **base)).eval()
    with torch.no_grad():  # the paper init zeroes the LM head: make logits informative
        m.lm_head.weight.normal_(std=0.05)
        m.pos_emb.weight.normal_(std=0.05)
    return m


def caption_image_doc(g: torch.Generator, n_text: int) -> torch.Tensor:
    """``<eos> caption <break> IMAGE`` in unified ids (paper §2.1 layout)."""
    text = VOCAB.text_to_ids(torch.randint(0, VOCAB.text_size, (n_text,), generator=g))
    image = VOCAB.codes_to_ids(torch.randint(0, VOCAB.image_size, (VOCAB.image_seq_len,), generator=g))
    eos, brk = torch.tensor([VOCAB.eos_id]), torch.tensor([VOCAB.break_id])
    return torch.cat([eos, text, brk, image])


def left_padded_docs(n_texts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    docs = [caption_image_doc(g, n) for n in n_texts]
    T = max(len(d) for d in docs)
    ids = torch.full((len(docs), T), VOCAB.pad_id, dtype=torch.long)
    valid = torch.zeros(len(docs), T, dtype=torch.bool)
    for i, d in enumerate(docs):
        ids[i, T - len(d) :] = d
        valid[i, T - len(d) :] = True
    return ids, valid


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@torch.no_grad()
def test_exported_model_gives_identical_logits(tmp_path, activation):
    model = randomized(activation=activation)
    export_hf(model, tmp_path / "hf", vocab=VOCAB)
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, valid = left_padded_docs([3, 9, 6])
    # Unpadded batch: positions 0..T-1 on both sides.
    torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
    # Left-padded batch: OPT derives positions from attention_mask by cumsum.
    ours = model(ids, positions_from_valid(valid), key_valid=valid)
    theirs = hf(ids, attention_mask=valid.long()).logits
    torch.testing.assert_close(theirs[valid], ours[valid], atol=1e-5, rtol=0)


def test_exported_config_describes_the_same_network(tmp_path):
    model = randomized(d_ff=48)
    export_hf(model, tmp_path / "hf", vocab=VOCAB)
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert c["model_type"] == "opt"
    assert c["enable_bias"] is False and c["layer_norm_elementwise_affine"] is False
    assert c["do_layer_norm_before"] is True and c["tie_word_embeddings"] is False
    assert (c["hidden_size"], c["word_embed_proj_dim"], c["ffn_dim"]) == (32, 32, 48)
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["max_position_embeddings"]) == (2, 4, 40)
    assert (c["vocab_size"], c["pad_token_id"], c["eos_token_id"]) == (VOCAB.size, VOCAB.pad_id, VOCAB.eos_id)
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf")
    pos = hf.model.decoder.embed_positions.weight
    assert pos.shape == (40 + 2, 32)  # OPT looks up position + 2
    torch.testing.assert_close(pos[2:], model.pos_emb.weight, atol=0, rtol=0)
    assert not any("bias" in n for n, _ in hf.named_parameters())


@torch.no_grad()
def test_export_import_round_trip_is_exact(tmp_path):
    model = randomized(activation="gelu", d_ff=80)
    export_hf(model, tmp_path / "hf")
    back, cfg = import_hf(tmp_path / "hf")
    assert cfg == model.cfg
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@torch.no_grad()
def test_to_hf_shares_no_storage_with_our_model():
    model = randomized()
    hf = to_hf(model)
    ours = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not ours & {p.untyped_storage().data_ptr() for p in hf.parameters()}


@torch.no_grad()
def test_import_tied_opt_checkpoint_made_by_transformers(tmp_path):
    """An OPT built and initialised by transformers itself is an independent reference."""
    torch.manual_seed(5)
    cfg = OPTConfig(
        vocab_size=VOCAB.size, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, ffn_dim=40,
        max_position_embeddings=30, enable_bias=False, layer_norm_elementwise_affine=False,
        do_layer_norm_before=True, tie_word_embeddings=True, dropout=0.0, pad_token_id=0,
    )
    hf = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.decoder.embed_positions.weight.normal_(std=0.1)
    hf.save_pretrained(tmp_path / "hf")
    model, mcfg = import_hf(tmp_path / "hf")
    assert (mcfg.d_model, mcfg.n_heads, mcfg.ffn_dim, mcfg.max_seq_len) == (24, 3, 40, 30)
    ids, valid = left_padded_docs([2, 5])
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    ours = model(ids, positions_from_valid(valid), key_valid=valid)
    torch.testing.assert_close(ours[valid], hf(ids, attention_mask=valid.long()).logits[valid], atol=1e-5, rtol=0)


@torch.no_grad()
def test_kv_cache_greedy_decoding_matches_transformers_generate():
    model = randomized(seed=4)
    hf = to_hf(model, VOCAB)
    ids, valid = left_padded_docs([1, 4, 7])
    n_new = 6
    cache = KVCache.allocate(model.cfg, 3, ids.shape[1] + n_new)
    nxt = prefill(model, ids, valid, cache)[:, -1].argmax(-1, keepdim=True)
    ours = [nxt]
    for _ in range(n_new - 1):
        nxt = decode_one_token(model, nxt, cache).argmax(-1, keepdim=True)
        ours.append(nxt)
    theirs = hf.generate(
        ids, attention_mask=valid.long(), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
        pad_token_id=VOCAB.pad_id, eos_token_id=None,
    )[:, ids.shape[1] :]
    assert torch.equal(torch.cat(ours, dim=1), theirs)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"enable_bias": True}, "enable_bias=True"),
        ({"layer_norm_elementwise_affine": True}, "layer_norm_elementwise_affine=True"),
        ({"do_layer_norm_before": False}, "post-LN"),
        ({"word_embed_proj_dim": 16}, "word_embed_proj_dim=16"),
        ({"activation_function": "silu"}, "activation_function='silu'"),
        ({"model_type": "llama"}, "expected an OPT config"),
    ],
)
def test_import_refuses_what_our_decoder_cannot_represent(tmp_path, change, message):
    export_hf(randomized(), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        import_hf(tmp_path / "hf")


def test_import_refuses_stock_opt_with_biases(tmp_path):
    cfg = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32)
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="cannot be represented.*enable_bias.*layer_norm_elementwise_affine"):
        import_hf(tmp_path / "opt")


def test_import_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        import_hf(tmp_path)
    export_hf(randomized(), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        import_hf(tmp_path / "hf")


@torch.no_grad()
def test_cli_export_then_import(tmp_path, capsys):
    model = randomized()
    save_model(model, tmp_path / "ours")
    assert cli_main(["export-hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    assert cli_main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert cli_main(["export-hf", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_export_reads_vocab_json_of_a_pipeline_directory(tmp_path, capsys):
    from cm3leon.config import save_json

    save_model(randomized(), tmp_path / "ours")
    save_json(Vocab(text_size=61, image_size=32, image_seq_len=8).to_dict(), tmp_path / "ours" / "vocab.json")
    assert cli_main(["export-hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 1
    assert f"does not match ModelConfig.vocab_size={VOCAB.size}" in capsys.readouterr().err
    save_json(VOCAB.to_dict(), tmp_path / "ours" / "vocab.json")
    assert cli_main(["export-hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (c["vocab_size"], c["bos_token_id"], c["eos_token_id"]) == (VOCAB.size, VOCAB.eos_id, VOCAB.eos_id)
    assert cli_main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "hf")]) == 1
    assert "input directory" in capsys.readouterr().err
