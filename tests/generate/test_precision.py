"""Lower-precision decoding copies (generate/precision.py) on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from cm3leon.config import ModelConfig
from cm3leon.generate.decode import generate_image_tokens
from cm3leon.generate.logits import SamplingConfig
from cm3leon.generate.precision import for_decoding
from cm3leon.model.transformer import Transformer
from cm3leon.vocab import Vocab

V = Vocab(text_size=40, image_size=24, image_seq_len=12)
PROMPTS = [[V.eos_id, *V.text_to_ids([1, 2, 3]), V.break_id], [V.eos_id, *V.text_to_ids([5]), V.break_id]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=V.size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    with torch.no_grad():
        torch.nn.init.normal_(m.lm_head.weight, std=1.0)
    return m.eval()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_lower_precision_copy_decodes_close_to_fp32(model: Transformer, precision: str) -> None:
    low = for_decoding(model, precision)
    assert low is not model and next(model.parameters()).dtype == torch.float32  # the original is untouched
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        ref, got = model(ids)[0, -1], low(ids)[0, -1].float()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    cfg = SamplingConfig(greedy=True, guidance=3.0)
    for window in (0, 4):
        codes = generate_image_tokens(low, V, PROMPTS, cfg, jacobi_window=window)
        assert codes.shape == (2, V.image_seq_len) and 0 <= codes.min() and codes.max() < V.image_size


def test_unknown_precision_is_refused(model: Transformer) -> None:
    assert for_decoding(model, "fp32") is model
    with pytest.raises(ValueError, match="precision must be one of"):
        for_decoding(model, "fp8")
