import numpy as np
import pytest

from ratequant.allocation import Budget, CostModel, Curves
from ratequant.calibration.candidates import Candidate, choice_tokens_for, choose_candidate, split_allocations
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
    # widths per kind: keys from 3 (a floor), values among 2..3
    assert list(split_allocations(Budget.avg_bits(3.0), curves, _cost(), (3, 4, 5), (2, 3))) == ["K4V2", "K3V3"]


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

        def kl(spec, window, fav=fav):
            return 0.1 if np.array_equal(spec.bits, fav) else 0.5

        choice = choose_candidate(kl, candidates, windows=3)
        assert choice.best.name == favourite and choice.kl[favourite] == 0.1 and set(choice.kl) == set("abc")
        assert choice.windows == dict.fromkeys("abc", 1)  # a clear winner costs one window
    # a tie keeps the first listed; one candidate is not scored at all
    assert choose_candidate(lambda spec, window: 0.2, candidates).best.name == "a"
    single = choose_candidate(lambda spec, window: pytest.fail("scored"), candidates[:1])
    assert single.best is candidates[0] and single.kl == single.windows == {}
    with pytest.raises(RateQuantError, match="no candidate"):
        choose_candidate(lambda spec, window: 0.0, [])


def test_a_close_call_is_settled_on_more_windows_and_only_among_the_close():
    a, b, c = _candidate("a", 3, 2), _candidate("b", 2, 3), _candidate("c", 4, 2)
    table = {"a": [0.100, 0.140, 0.150], "b": [0.110, 0.100, 0.100], "c": [0.200, 0.0, 0.0]}
    calls = []

    def kl(spec, window):
        name = next(x.name for x in (a, b, c) if np.array_equal(spec.bits, x.allocation.bits))
        calls.append((name, window))
        return table[name][window]

    choice = choose_candidate(kl, [a, b, c], windows=3, margin=0.25)
    # c is 100% above the best after window 0 and never scored again; b overtakes a on the later windows
    assert choice.best.name == "b" and choice.windows == {"a": 3, "b": 3, "c": 1}
    assert ("c", 1) not in calls and choice.kl["b"] == pytest.approx(0.31 / 3)
    # after window 1, a's mean is 14% above b's: close at 25%; at 10% a drops out and b, alone, needs no window 2
    narrow = choose_candidate(kl, [a, b, c], windows=3, margin=0.1)
    assert narrow.best.name == "b" and narrow.windows == {"a": 2, "b": 2, "c": 1}
    # one window is the old rule: the least KL on window 0 wins
    assert choose_candidate(kl, [a, b, c], windows=1).best.name == "a"


def test_a_tie_costs_no_more_windows():
    a, b, c = _candidate("a", 3, 2), _candidate("b", 2, 3), _candidate("c", 4, 2)
    table = {"a": [0.100, 0.110, 0.110], "b": [0.103, 0.100, 0.100], "c": [0.200, 0.0, 0.0]}

    def kl(spec, window):
        return table[next(x.name for x in (a, b, c) if np.array_equal(spec.bits, x.allocation.bits))][window]

    # b is 3% above a after window 0 (c, 100% above, is out): a tie at 5%, so a wins on one window
    tie = choose_candidate(kl, [a, b, c], windows=3)
    assert tie.best.name == "a" and tie.windows == dict.fromkeys("abc", 1)
    # at 1% it is a close call: both go on, and b wins on three windows
    close = choose_candidate(kl, [a, b, c], windows=3, tie=0.01)
    assert close.best.name == "b" and close.windows == {"a": 3, "b": 3, "c": 1}


def test_held_out_windows_must_read_quantized_history():
    assert choice_tokens_for(None, 128, 16) == 1024
    assert choice_tokens_for(None, 1024, 0) == 2304  # grown in steps of 256 past twice the residual window
    assert choice_tokens_for(512, 128, 0) == 512
    with pytest.raises(RateQuantError, match="at least 514"):
        choice_tokens_for(300, 256, 0)
