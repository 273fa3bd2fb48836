"""server.settle_garbage_collector: start-up's objects frozen, young collections rarer."""

from __future__ import annotations

import gc

from batchproxy import server


def test_settling_freezes_what_exists_and_raises_the_young_threshold():
    threshold = gc.get_threshold()
    try:
        gc.unfreeze()
        kept = [[] for _ in range(1000)]  # containers alive now: start-up's, in a server
        server.settle_garbage_collector()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold() == (server.GC_YOUNG_THRESHOLD, *threshold[1:])
        assert threshold[0] < server.GC_YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
