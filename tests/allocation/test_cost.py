"""Cost model (:mod:`ratequant.allocation.cost`): bytes per token of codes, metadata and the full-precision
tokens, the spec's byte formula, and bytes-per-token budgets met by the allocator."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ratequant.allocation import AllocationOptions, Budget, CostModel, Curves, allocate
from ratequant.errors import BudgetError, RateQuantError
from ratequant.geometry import Geometry
from ratequant.quantizers import get_quantizer
from ratequant.spec import KVQuantSpec, StoragePolicy
from tests.allocation.helpers import ALL, FakeQuantizer, G, fitted, table_for


def test_cost_model_counts_codes_metadata_and_residual():
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 100), G, 1000)
    # affine with one slope for everyone: 32 codes per bit = 4 bytes, plus 4 bytes of scale and zero
    np.testing.assert_allclose(np.diff(cm.table, axis=1), 32 / 8)
    np.testing.assert_allclose(cm.table[:, 0] - 32 / 8, 4.0)
    assert cm.depends_on_bits and cm.context_tokens == 1000 and cm.num_components == 36
    bits = np.full(G.shape, 4)
    per_token = 36 * (32 * 4 + 32) / 8  # codes + scale/zero, all components
    fp = 36 * 32 * 2
    # 1000 tokens = 10 full chunks of 100 quantized; the residual buffers are empty
    assert cm.bytes_per_token(bits) == pytest.approx(per_token)
    assert cm.fixed_bytes_per_token == 0
    # 3 chunks of 300 quantized; 100 tokens per kind wait at full precision
    partial = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 300), G, 1000)
    assert partial.bytes_per_token(bits) == pytest.approx(0.9 * per_token + 0.1 * fp)
    assert partial.fixed_bytes_per_token == pytest.approx(0.1 * fp)
    # sink tokens are kept at full precision too, amortised like the residual window
    sinks = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 100, sink_tokens=100), G, 1000)
    assert sinks.bytes_per_token(bits) == pytest.approx(0.9 * per_token + 0.1 * fp)
    codebook = CostModel.from_policy(StoragePolicy(FakeQuantizer(codebook=True), 0), G, 1)
    slopes = np.diff(codebook.table, axis=1)
    assert not np.allclose(slopes, slopes[0, 0])  # not affine: bytes per bit depend on the width
    with pytest.raises(RateQuantError, match="bitset"):
        cm.bytes_per_token(np.full(G.shape, 9))
    with pytest.raises(RateQuantError, match="N even"):
        CostModel(ALL, np.ones((3, 8)), 0.0, 10)
    with pytest.raises(RateQuantError, match="must not decrease"):
        CostModel((1, 2), np.array([[2.0, 1.0], [1.0, 2.0]]), 0.0, 10)


# --------------------------------------------------------------------------------------------------------
# The cost model is the spec's byte formula
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "design, residual, sinks, tokens",
    [
        ("kivi", 128, 0, 4096),
        ("kivi", 0, 0, 1000),
        ("kivi", 64, 0, 700),
        ("uniform", 0, 0, 333),
        ("turbo", 128, 0, 2000),
        *[(d, r, s, t) for d in ("kivi", "uniform") for r in (0, 128) for s in (0, 4) for t in (3, 333, 2000)],
    ],
)
def test_cost_model_agrees_with_the_spec_formula(design, residual, sinks, tokens):
    g = Geometry(4, 3, 64)
    quantizer = get_quantizer(design)
    policy = StoragePolicy(quantizer, residual, sinks)
    cm = CostModel.from_policy(policy, g, tokens)
    rng = np.random.default_rng(tokens + residual + sinks)
    for _ in range(3):
        bits = rng.integers(1, 9, size=g.shape)
        expected = KVQuantSpec(bits, quantizer, residual, sinks).expected_bytes(g.head_dim, tokens).total
        got = cm.bytes_per_token(bits) * tokens
        assert got == pytest.approx(expected, abs=2)  # integer rounding of codes and metadata only
        assert abs(got - expected) <= 1e-3 * expected


def test_a_residual_that_is_not_a_multiple_of_the_token_group_is_refused_everywhere():
    from ratequant.calibration import CalibrationSettings

    kivi = get_quantizer("kivi", group_size=32)
    with pytest.raises(RateQuantError) as direct:
        StoragePolicy(kivi, 48)
    message = str(direct.value)
    assert "residual length 48 is not a multiple" in message and "token group (32)" in message

    def refused(fn):
        with pytest.raises(RateQuantError) as exc:
            fn()
        return str(exc.value)

    assert refused(lambda: CostModel.from_policy(StoragePolicy(kivi, 48), G, 4096)) == message
    assert refused(lambda: KVQuantSpec(np.full(G.shape, 4), kivi, 48)) == message
    assert (
        refused(lambda: CalibrationSettings(quantizer="kivi", quantizer_params={"group_size": 32}, residual_length=48))
        == message
    )
    # and a multiple is fine everywhere
    policy = StoragePolicy(kivi, 64)
    assert policy.chunks == (64, 64)
    CostModel.from_policy(policy, G, 4096)
    KVQuantSpec(np.full(G.shape, 4), kivi, 64)
    CalibrationSettings(quantizer="kivi", quantizer_params={"group_size": 32}, residual_length=64)


# --------------------------------------------------------------------------------------------------------
# Budgets in bytes
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget_bytes", [600.0, 700.5, 1000.0, 1206.0])
def test_byte_budget_uses_the_most_code_bits_that_fit(budget_bytes):
    curves = fitted(G, noise=0.1)
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 0), G, 512)
    alloc = allocate(curves, Budget.bytes_per_token(budget_bytes, 512), options=AllocationOptions(cost_model=cm))
    assert alloc.bytes_per_token <= budget_bytes
    # one more code bit anywhere costs 4 bytes: the allocation leaves less than that unused
    assert budget_bytes - alloc.bytes_per_token < 4.0
    assert alloc.bytes_per_token == pytest.approx(36 * 4.0 + 4.0 * alloc.bits.sum() + cm.fixed_bytes_per_token)
    assert alloc.details["byte_model"] == "affine"
    # and it is the avg-bits optimum at that many code bits
    same = allocate(curves, Budget.avg_bits(alloc.avg_bits))
    np.testing.assert_array_equal(same.bits, alloc.bits)


def test_byte_budget_range_errors():
    curves = fitted(G)
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 64), G, 1024)
    opts = AllocationOptions(cost_model=cm)
    with pytest.raises(BudgetError, match="outside the reachable range"):
        allocate(curves, Budget.bytes_per_token(100.0, 1024), options=opts)
    with pytest.raises(BudgetError, match="outside the reachable range"):
        allocate(curves, Budget.bytes_per_token(1e6, 1024), options=opts)
    with pytest.raises(BudgetError, match="same length"):
        allocate(curves, Budget.bytes_per_token(1000.0, 512), options=opts)
    with pytest.raises(BudgetError, match="needs a cost model"):
        allocate(curves, Budget.bytes_per_token(1000.0, 1024))
    short = CostModel.from_policy(StoragePolicy(FakeQuantizer(), 64), G, 32)
    assert not short.depends_on_bits
    with pytest.raises(BudgetError, match="residual window"):
        allocate(curves, Budget.bytes_per_token(5000.0, 32), options=AllocationOptions(cost_model=short))


def test_byte_budget_with_width_dependent_metadata_is_optimal():
    g = Geometry(1, 2, 8)  # 4 components
    bitset = (1, 2, 3, 4)
    table = table_for(g, bitset=bitset, seed=4, noise=0.2)
    cm = CostModel.from_policy(StoragePolicy(FakeQuantizer(codebook=True), 0), g, 1, bitset=bitset)
    slopes = np.diff(cm.table, axis=1)
    assert not np.allclose(slopes, slopes[0, 0])
    flat = table.reshape(4, 4)
    fixed = cm.fixed_bytes_per_token
    for budget in (21.0, 24.0, 29.5, 33.3, 40.0):  # reachable for the codes and metadata: [21, 40]
        alloc = allocate(
            Curves.measured(table, bitset),
            Budget.bytes_per_token(budget + fixed, 1),
            options=AllocationOptions(cost_model=cm),
        )
        assert alloc.bytes_per_token <= budget + fixed and alloc.details["byte_model"] == "table"
        best = math.inf
        for choice in itertools.product(range(4), repeat=4):
            if sum(cm.table[i, j] for i, j in enumerate(choice)) <= budget:
                best = min(best, sum(flat[i, j] for i, j in enumerate(choice)))
        assert alloc.predicted_distortion == pytest.approx(best, rel=1e-12)
