"""Bit packing of the GPTQ format: round trips, and agreement with an independent packer."""
import pytest
import torch
from checkpoint_fixture import pack_columns, pack_stream
from hypothesis import given, settings
from hypothesis import strategies as st

from gptq_lab import kernels
from gptq_lab.quant import (
    pack_qweight,
    pack_qzeros,
    pack_rows,
    packed_length,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)

BITS = [2, 3, 4, 8]


@st.composite
def packable(draw):
    """(bits, values [R, L]) with L a whole number of int32 words' worth of values."""
    bits = draw(st.sampled_from(BITS))
    per = 32 if bits == 3 else 32 // bits
    rows = draw(st.integers(1, 4))
    length = per * draw(st.integers(1, 6 if bits == 3 else 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return bits, torch.randint(0, 1 << bits, (rows, length), generator=gen)


@settings(max_examples=60, deadline=None)
@given(packable())
def test_pack_rows_round_trip(case):
    bits, values = case
    words = pack_rows(values, bits)
    assert words.dtype == torch.int32 and words.shape == (values.shape[0], values.shape[1] * bits // 32)
    assert torch.equal(unpack_rows(words, bits, values.shape[1]), values.to(torch.int32))


@settings(max_examples=60, deadline=None)
@given(packable())
def test_qweight_matches_independent_packer_and_kernel_unpack(case):
    bits, codes = case                                       # codes [N, K]
    qweight = pack_qweight(codes, bits)                      # [K*bits/32, N]
    assert torch.equal(qweight, pack_columns(codes.t(), bits))
    assert torch.equal(unpack_qweight(qweight, bits, codes.shape[1]), codes.to(torch.int32))
    assert torch.equal(kernels.reference.unpack_along_rows(qweight, bits, codes.shape[1]), codes.t().to(torch.int32))


@settings(max_examples=60, deadline=None)
@given(packable(), st.booleans())
def test_qzeros_round_trip_v1_and_v2(case, v1):
    bits, zeros_t = case                                     # [G, N] -> zeros [N, G]
    zeros = zeros_t.t()
    qzeros = pack_qzeros(zeros, bits, v1=v1)                 # [G, N*bits/32]
    stored = (zeros_t - 1) & ((1 << bits) - 1) if v1 else zeros_t
    expected = torch.stack([torch.tensor(pack_stream(row.tolist(), bits)) for row in stored]).to(torch.int32)
    assert torch.equal(qzeros, expected)
    assert torch.equal(unpack_qzeros(qzeros, bits, zeros.shape[0], v1=v1), zeros.to(torch.int32))


def test_three_bit_values_straddle_words():
    # 32 three-bit values fill 3 words; value 10 sits at bits 30..32, across words 0 and 1.
    values = torch.zeros(1, 32, dtype=torch.int64)
    values[0, 10] = 0b111
    words = pack_rows(values, 3)
    assert words.tolist() == [[to_signed(0b11 << 30), 1, 0]]
    assert unpack_rows(words, 3, 32)[0, 10] == 7


def to_signed(w):
    return w - (1 << 32) if w >= 1 << 31 else w


@pytest.mark.parametrize("bits,length", [(3, 48), (4, 12), (2, 20), (8, 6)])
def test_lengths_that_do_not_fill_words_are_refused(bits, length):
    with pytest.raises(ValueError, match="multiple of"):
        packed_length(length, bits)
