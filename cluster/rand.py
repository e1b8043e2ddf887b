"""cluster's own random generator, for routing picks and the background loops' jitter.

Drawn from the process's ``random`` module, every pick and every retry's jitter moved
the state of a sequence the user may have seeded (``random.seed``) and relies on, from
request greenlets and background threads alike; Hypothesis, for one, fails a test
whose random state another thread moved while it generated data.
"""

from __future__ import annotations

import random

#: the generator (``random.Random``'s methods: ``random()``, ``uniform()``, ``choice()``)
RANDOM = random.Random()
