"""Word pools for the synthetic tasks: needle keys, common-word lists and variable names.

RULER draws needle keys and list words from a vocabulary of common English words; a fixed, built-in pool keeps the
tasks offline and the same on every machine. Words are lower-case and alphabetic, and none is part of another, so
string matching never credits one word for another.
"""

from __future__ import annotations

import random
import string

_POOL = """
able acid aged airport album alley amber anchor angle ankle answer apple april arch arena armor arrow artist autumn
avenue bacon badge baker balcony ballet bamboo banana banner barrel basket beacon beaver bench berry bicycle biscuit
blanket blossom border bottle boulder bracket branch breeze brick bridge bronze bucket buffalo bundle butter button
cabin cable cactus camera camel canal candle canvas canyon carbon carpet castle cattle cellar cement cereal chalk
channel chapel cherry chimney circle citizen clover cobalt coffee comet copper coral cotton cradle crater cricket
crystal curtain cushion dancer desert diamond dinner dragon drawer dune eagle echo elbow ember engine falcon feather
fender ferry fiddle finger forest fossil fountain fox frost galaxy garden garlic ginger glacier goblet granite
gravel guitar hammer harbor harvest helmet hermit honey horizon hunter island ivory jacket jaguar jasmine jelly
jewel jungle kettle kitten ladder lagoon lantern lemon leopard lettuce library lizard lobster locket magnet mango
marble meadow melon mirror monkey mosaic muffin museum needle nickel noodle oasis ocean olive onion orange orchid
otter oyster paddle palace panther parrot pasta peach pebble pencil pepper pigeon pillow pirate planet plaster
pocket potato prism pumpkin puzzle quartz rabbit radish raven ribbon river rocket saddle salmon sapphire scarf
shadow shelter silver sketch sparrow spider spinach spiral sponge statue steam summit sunset temple thunder ticket
tiger timber tomato torch tractor trumpet tulip tunnel turtle umbrella valley velvet violin volcano wagon walnut
walrus willow window winter wizard yacht zebra
"""
_RAW = frozenset(_POOL.split())
WORDS: tuple[str, ...] = tuple(sorted(w for w in _RAW if not any(w != o and w in o for o in _RAW)))


def sample_words(rng: random.Random, n: int, exclude: set[str] | None = None) -> list[str]:
    """``n`` distinct words from :data:`WORDS` (minus ``exclude``), in random order."""
    pool = [w for w in WORDS if not exclude or w not in exclude]
    if n > len(pool):
        raise ValueError(f"asked for {n} distinct words, the pool has {len(pool)}")
    return rng.sample(pool, n)


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A ``digits``-digit decimal number without a leading zero (RULER's needle values)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A UUID4-formatted string drawn from ``rng`` (deterministic, unlike :func:`uuid.uuid4`)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


def random_variable(rng: random.Random, exclude: set[str] | None = None) -> str:
    """A five-letter upper-case variable name (RULER's variable tracking), not in ``exclude``."""
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if not exclude or name not in exclude:
            return name
