"""Bit packing of the GPTQ format: round trips, agreement with an independent packer and with
the previous (loop) packer."""
import itertools

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


def loop_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The packer this project shipped before the vectorised one (commit 385e96b), kept as an
    oracle: a loop over the 32 values of a 32-value run, or shifts and a sum for short rows."""
    r, length = values.shape
    v64 = values.to(torch.int64)
    if length % 32:
        per = 32 // bits
        words = (v64.reshape(r, -1, per) << torch.arange(per, dtype=torch.int64) * bits).sum(-1)
    else:
        v = v64.reshape(r, length // 32, 32)
        words = torch.zeros(r, v.shape[1], bits, dtype=torch.int64)
        for k in range(32):
            w, off = divmod(bits * k, 32)
            words[:, :, w] |= (v[:, :, k] << off) & 0xFFFFFFFF
            if off + bits > 32:
                words[:, :, w + 1] |= v[:, :, k] >> (32 - off)
        words = words.reshape(r, length * bits // 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_pack_rows_is_bitwise_the_previous_packer(bits, dtype, device):
    gen = torch.Generator().manual_seed(bits)
    lengths = [32, 96, 4096] + ([] if bits == 3 else [32 // bits, 3 * 32 // bits])   # short rows too
    for rows, length in itertools.product((1, 5, 64), lengths):
        codes = torch.randint(0, 1 << bits, (rows, length), generator=gen).to(dtype)
        codes[0, :2] = (1 << bits) - 1                                               # the sign bit set
        packed = pack_rows(codes.to(device), bits)
        assert packed.device.type == device and packed.dtype == torch.int32
        assert torch.equal(packed.cpu(), loop_pack_rows(codes, bits)), (rows, length)
        assert torch.equal(pack_qweight(codes.to(device), bits).cpu(), loop_pack_rows(codes, bits).t())


def test_a_result_packs_where_its_codes_are_when_its_shape_allows():
    from gptq_lab import QuantConfig, QuantLinear, rtn_result
    w = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))           # K = 40: 4-bit yes, 3-bit no
    four = rtn_result(w, QuantConfig(bits=4, group_size=-1)).pack()
    assert torch.equal(four.qweight, pack_qweight(four.codes, 4))
    assert torch.equal(four.qzeros, pack_qzeros(four.zeros, 4, v1=False))
    assert torch.equal(QuantLinear.from_result(four).qweight, four.qweight)
    three = rtn_result(w, QuantConfig(bits=3, group_size=-1)).pack()
    assert three.qweight is None and three.qzeros is None
    with pytest.raises(ValueError, match="multiples of 32"):
        QuantLinear.from_result(three)
