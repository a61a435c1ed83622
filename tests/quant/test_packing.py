import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant import pack_bits, pack_units, unpack_bits, unpack_units
from kvquant.quant.packing import lut_words


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
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
    assert pack_units(codes, bits).numel() * 32 == 1024 * bits  # exactly `bits` bits per code, nothing wasted


def selectors(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The four selector words of each unit, cut from its words as the decode kernel cuts them."""
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(-2, -1)
    m3, m4 = 0x33333333, 0x44444444
    if bits == 4:
        return w
    s = [w[..., 0] & m3, (w[..., 0] >> 2) & m3, w[..., 1] & m3, (w[..., 1] >> 2) & m3]
    if bits == 3:
        h = w[..., 2]
        s = [s[0] | ((h << 2) & m4), s[1] | ((h << 1) & m4), s[2] | (h & m4), s[3] | ((h >> 1) & m4)]
    return torch.stack(s, -1)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), units=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_selector_words_hold_the_codes_nibble_by_nibble(bits, units, seed):
    """Selector g of a unit has code 8g+i at nibble i: what one byte-permute lookup reads."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, 32 * units), generator=g)
    sel = selectors(pack_units(codes, bits), bits)  # [3, units, 4]
    nibbles = (sel[..., None] >> (4 * torch.arange(8))) & 15
    assert torch.equal(nibbles.reshape(3, -1), codes)


def test_bit_layout():
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[5] = 0b101  # group 0, nibble 5: low bits at bit 20 of W0, third bit at bit 20 of W2
    codes[8 + 1] = 0b011  # group 1, nibble 1: low bits at bits 6-7 of W0
    assert pack_units(codes, 3)[:, 0].tolist() == [(0b01 << 20) | (0b11 << 6), 0, 1 << 20]
    codes[31] = 0b111  # the top nibble sets the sign bit of W1 and W2
    assert unpack_units(pack_units(codes, 3), 3).tolist() == codes.tolist()


def test_lut_words_hold_the_level_bytes():
    levels = torch.tensor([-1.0, -0.25, 0.5, 1.0])
    words = lut_words(levels, torch.float16)
    bits16 = levels.half().view(torch.int16).int() & 0xFFFF
    assert words[0].item() & 0xFFFFFFFF == sum(int(b & 0xFF) << (8 * i) for i, b in enumerate(bits16))
    assert words[4].item() & 0xFFFFFFFF == sum(int(b >> 8) << (8 * i) for i, b in enumerate(bits16))
    assert torch.equal(lut_words(levels, torch.bfloat16)[4:], lut_words(levels.bfloat16().float(), torch.bfloat16)[4:])
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        lut_words(levels, torch.float32)


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_units(torch.zeros(33, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="3 words per unit"):
        unpack_units(torch.zeros(2, 1, dtype=torch.int32), 3)
