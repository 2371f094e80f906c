import pytest
import torch

from ratequant.errors import RateQuantError
from ratequant.measure.rank import RankBases, rank_for_bits, simulated_rank_reduction
from tests.conftest import tiny_model


def low_rank_data(L=2, B=2, H=3, T=200, D=8, true_rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(L, 1, H, true_rank, D, generator=g)
    latent = torch.randn(L, B, H, T, true_rank, generator=g)
    return latent @ mixing + 5.0  # offset: the mean must be removed


def test_exact_reconstruction_at_the_data_rank_and_error_equals_dropped_variance():
    keys, values = low_rank_data(), low_rank_data(seed=1) * 2
    bases = RankBases.fit(keys, values)
    x = keys[1]  # [B, H, T, D]
    assert torch.allclose(bases.reconstruct(x, "key", 1, rank=3), x, atol=1e-3)
    assert bases.variances[..., 3:].abs().max() < 1e-3
    # at rank 1 the mean squared error per token equals the sum of the dropped variances (sample statistics)
    err = (bases.reconstruct(values[0], "value", 0, rank=1) - values[0]).pow(2).sum(-1).mean(dim=(0, 2))
    n = values.shape[1] * values.shape[3]
    expected = bases.residual_variance(1)[1, 0] * (n - 1) / n
    assert torch.allclose(err, expected, rtol=1e-3)


def test_padding_is_excluded_from_the_fit():
    keys = low_rank_data(B=1, T=100)
    padded = torch.cat([keys, torch.full_like(keys[..., :20, :], 1e3)], dim=3)
    mask = torch.cat([torch.ones(1, 100), torch.zeros(1, 20)], dim=1).bool()
    a = RankBases.fit(keys, keys)
    b = RankBases.fit(padded, padded, mask)
    assert torch.allclose(a.means, b.means) and torch.allclose(a.variances, b.variances, rtol=1e-4, atol=1e-4)


def test_rank_for_bits_matches_storage():
    assert rank_for_bits(2.5 * 64) == 10
    assert rank_for_bits(2.5 * 64 + 32, coefficient_bits=4, metadata_bits=32) == 40
    assert rank_for_bits(10) == 0


def test_full_rank_simulation_is_lossless_and_low_rank_changes_logits():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    from ratequant.measure.capture import capture

    stats = capture(model, ids, gradients=False, queries=False)
    bases = RankBases.fit(stats.keys, stats.values, stats.attention_mask)
    with torch.no_grad():
        reference = model(ids).logits
        with simulated_rank_reduction(model, bases, rank=stats.keys.shape[-1]):
            full = model(ids).logits
        with simulated_rank_reduction(model, bases, rank=1):
            reduced = model(ids).logits
    assert torch.allclose(full, reference, atol=1e-4)
    assert (reduced - reference).abs().max() > 1e-2
    with pytest.raises(RateQuantError, match="rank must be between"):
        bases.reconstruct(stats.keys[0], "key", 0, rank=99)
