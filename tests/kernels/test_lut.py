"""The GPU's codes-to-levels PTX, checked on any machine with an emulator of its instructions."""

import pytest
import torch

from kvquant.kernels.lut import PTX, ptx_lookup
from kvquant.quant.packing import lut_words, pack_units
from tests.kernels.ptx_emulator import run


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ptx_lookup_gives_every_code_its_level(bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        levels = torch.randn(2**bits, generator=g).sort().values
        codes = torch.randint(0, 2**bits, (32,), generator=g)
        words = [int(w) & 0xFFFFFFFF for w in pack_units(codes, bits)[:, 0]]
        tables = [int(w) & 0xFFFFFFFF for w in lut_words(levels, dtype)]
        lo, hi = tables[:4], tables[4:]
        inputs = words + (lo + hi if bits == 4 else [lo[0], lo[1], hi[0], hi[1]])
        regs = run(PTX[bits], {f"${16 + k}": v for k, v in enumerate(inputs)})
        got = []
        for r in range(16):
            got += [regs[f"${r}"] & 0xFFFF, regs[f"${r}"] >> 16]
        want = (levels.to(dtype).view(torch.int16).int() & 0xFFFF)[codes].tolist()
        assert got == want


def test_no_lookup_for_other_widths():
    with pytest.raises(ValueError, match="5-bit"):
        ptx_lookup(5)
