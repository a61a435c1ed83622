import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant import pack_bitplanes, pack_bits, unpack_bitplanes, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
       n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_identity_any_length(bits, shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*shape, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (*shape, bits, -(-n // 32))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_is_dense(bits):
    codes = torch.randint(0, 2**bits, (1024,), dtype=torch.uint8)
    packed = pack_bitplanes(codes, bits)
    assert packed.numel() * 32 == 1024 * bits  # exactly `bits` bits per code, nothing wasted


def test_bit_layout_is_planes():
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[5] = 0b101
    planes = pack_bitplanes(codes, 3)
    assert planes.tolist() == [[1 << 5], [0], [1 << 5]]
    codes[31] = 0b010  # lane 31 sets the sign bit of plane 1
    assert unpack_bitplanes(pack_bitplanes(codes, 3), 3).tolist() == codes.tolist()


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bitplanes(torch.zeros(33, dtype=torch.uint8), 3)
