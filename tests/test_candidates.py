import numpy as np
import pytest

from ratequant.allocation import Budget, CostModel, Curves
from ratequant.candidates import Candidate, choice_tokens_for, choose_candidate, split_allocations
from ratequant.errors import RateQuantError
from ratequant.geometry import Geometry
from ratequant.quantizers import get_quantizer
from ratequant.spec import StoragePolicy

GEOMETRY = Geometry(num_layers=2, num_kv_heads=2, head_dim=32)


def _cost(design="kivi", context=4096) -> CostModel:
    return CostModel.from_policy(StoragePolicy(get_quantizer(design), 0, 0), GEOMETRY, context, itemsize=4)


def test_splits_of_an_average_bits_budget_are_every_pair_with_that_mean():
    curves = Curves.flat(GEOMETRY, (2, 3, 4, 5, 6, 7, 8))
    splits = split_allocations(Budget.avg_bits(3.0), curves, _cost(), (2, 3, 4))
    assert list(splits) == ["K4V2", "K3V3", "K2V4"]
    assert all(s.avg_bits == 3.0 and s.method == "kv-split" for s in splits.values())
    assert (splits["K4V2"].bits[0] == 4).all() and (splits["K4V2"].bits[1] == 2).all()
    assert split_allocations(Budget.avg_bits(2.5), curves, _cost(), (3, 4)) == {}  # K3V2 needs width 2


def test_splits_of_a_byte_budget_are_the_largest_that_fit():
    cost = _cost()
    curves = Curves.flat(GEOMETRY, (2, 3, 4, 5, 6, 7, 8))
    k3v2 = np.empty(GEOMETRY.shape, dtype=np.int64)
    k3v2[0], k3v2[1] = 3, 2
    budget = Budget.bytes_per_token(cost.bytes_per_token(k3v2), 4096)
    splits = split_allocations(budget, curves, cost, (2, 3, 4, 5))
    assert set(splits) == {"K3V2", "K2V3"}  # K2V2 fits too but is not maximal; K3V3 does not fit
    assert all(s.bytes_per_token <= budget.value * (1 + 1e-9) for s in splits.values())


def _candidate(name: str, key: int, value: int) -> Candidate:
    bits = np.empty(GEOMETRY.shape, dtype=np.int64)
    bits[0], bits[1] = key, value
    curves = Curves.flat(GEOMETRY, (2, 3, 4))
    alloc = split_allocations(Budget.avg_bits((key + value) / 2), curves, _cost(), (key, value))[f"K{key}V{value}"]
    return Candidate(name, alloc, StoragePolicy(get_quantizer("kivi"), 0, 0), curves, _cost())


def test_the_candidate_with_the_least_kl_wins_each_in_turn():
    candidates = [_candidate("a", 3, 2), _candidate("b", 2, 3), _candidate("c", 4, 2)]
    for favourite in "abc":
        keyed = {c.name: c for c in candidates}
        fav = keyed[favourite].allocation.bits

        def kl(spec, fav=fav):
            return 0.1 if np.array_equal(spec.bits, fav) else 0.5

        best, scores = choose_candidate(kl, candidates)
        assert best.name == favourite and scores[favourite] == 0.1 and set(scores) == set("abc")
    # a tie keeps the first listed; one candidate is not scored at all
    assert choose_candidate(lambda spec: 0.2, candidates)[0].name == "a"
    assert choose_candidate(lambda spec: pytest.fail("scored"), candidates[:1]) == (candidates[0], {})
    with pytest.raises(RateQuantError, match="no candidate"):
        choose_candidate(lambda spec: 0.0, [])


def test_held_out_windows_must_read_quantized_history():
    assert choice_tokens_for(None, 128, 16) == 1024
    assert choice_tokens_for(None, 1024, 0) == 2304  # grown in steps of 256 past twice the residual window
    assert choice_tokens_for(512, 128, 0) == 512
    with pytest.raises(RateQuantError, match="at least 514"):
        choice_tokens_for(300, 256, 0)
