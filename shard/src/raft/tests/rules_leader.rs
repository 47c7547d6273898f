//! Rules of leadership: transfer, membership, ReadIndex, a single voter, robustness.
