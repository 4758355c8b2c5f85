"""A plain scalar implementation of the RNG contract, written from the spec with Python
ints, independent of fastreg's code: the tests' second opinion."""

M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def keep_list(numel, p, seed, offset=0, start=0):
    """The contract's keep flags of elements start .. start+numel-1."""
    seed %= 1 << 64
    offset %= 1 << 64
    if p >= 1:
        return [False] * numel
    t = int(p * 2.0**32)
    flags = []
    for q in range(start // 4, (start + numel + 3) // 4):
        words = philox4x32_10(
            (q & M32, q >> 32, offset & M32, offset >> 32), (seed & M32, seed >> 32)
        )
        flags += [w >= t for w in words]
    first = start % 4
    return flags[first : first + numel]
