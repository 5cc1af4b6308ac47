"""The greedy path with rejected options (error set to infinity, as the held-out check does to an embedding
split): a move between two rejected options was inf - inf = NaN, and one NaN sort key left the whole path in an
undefined order (a layer's later move before its earlier one: apply_moves raised mid-search; efficient moves
of other layers behind worthless ones)."""

from __future__ import annotations

import math
import random

from onnxpress.budget.paths import apply_moves, greedy_path


def _tables(rng: random.Random) -> list[list[tuple[float, float]]]:
    tables = []
    for _ in range(rng.randint(2, 6)):
        options, size = [(1000.0, 0.0)], 1000.0
        for _ in range(rng.randint(1, 5)):
            size -= rng.uniform(10, 200)
            options.append((size, rng.uniform(0, 0.05)))
        if rng.random() < 0.5:  # two rejected options that save the most (the splits' place on a hull)
            for _ in range(2):
                size -= rng.uniform(10, 100)
                options.append((size, math.inf))
        tables.append(options)
    return tables


def test_rejected_options_cost_infinitely_much_and_come_last():
    path = greedy_path([[(100.0, 0.0), (50.0, 0.01), (30.0, math.inf), (20.0, math.inf)], [(100.0, 0.0), (60.0, 0.001), (40.0, 0.02)]])
    assert [(m.layer, m.dst) for m in path] == [(1, 1), (0, 1), (1, 2), (0, 2), (0, 3)]
    assert [m.cost for m in path[3:]] == [math.inf, math.inf]


def test_paths_with_rejected_options_keep_each_layers_order_and_sort_by_efficiency():
    rng = random.Random(0)
    for _ in range(500):
        path = greedy_path(_tables(rng))
        apply_moves(path)  # raises when a layer's move does not start where its previous one ended
        efficiency = [m.efficiency for m in path]
        assert not any(math.isnan(e) for e in efficiency)
        assert all(a >= b for a, b in zip(efficiency, efficiency[1:]))
