"""Best-fit-decreasing bin packing of whole samples into fixed-size rows, over the whole dataset.

Samples are taken longest first; each goes into the open row with the least room that still
fits it, else opens a row. Rows are tracked by remaining room in a sorted list of distinct room
values (at most `capacity` of them), so each placement is a bisect, whatever the dataset size.
Deterministic: ties go to the most recently touched row; equal lengths keep their input order.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows as lists of sample indices (each row's samples longest first); every length must be
    ≤ capacity. Rows are in the order they were opened."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit rows of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    rooms: list[int] = []                 # distinct remaining-room values with an open row
    open_rows: dict[int, list[int]] = {}  # room → rows with exactly that room
    for index in order.tolist():
        size = int(lengths[index])
        at = bisect_left(rooms, size)
        if at == len(rooms):
            row, room = len(rows), capacity
            rows.append([])
        else:
            room = rooms[at]
            row = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room]
                rooms.pop(at)
        rows[row].append(index)
        left = room - size
        if left > 0:
            if left not in open_rows:
                open_rows[left] = []
                insort(rooms, left)
            open_rows[left].append(row)
    return rows
