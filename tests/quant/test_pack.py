import pytest
import torch

from graftlm.quant.pack import BITS, pack, row_bytes, unpack


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64])
def test_pack_round_trips_exactly(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 100 + n)
    idx = torch.randint(0, 1 << bits, (5, n), generator=g)
    packed = pack(idx, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, row_bytes(n, bits))
    assert torch.equal(unpack(packed, bits, n), idx)


def test_bit_layout_is_a_little_endian_stream() -> None:
    # three 3-bit indices 5, 1, 6 -> bits 101 100 011 (lowest first) -> 0b10_001_101, then 0b1
    packed = pack(torch.tensor([[5, 1, 6]]), 3)
    assert packed.tolist() == [[0b10001101, 0b1]]


def test_bad_indices_and_widths_are_refused() -> None:
    with pytest.raises(ValueError, match="lie in"):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bits per index"):
        pack(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="takes"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 9)
