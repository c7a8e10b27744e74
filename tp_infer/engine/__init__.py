"""Rank 0's engine: sessions and turns, the scheduler, the step loop, and the rank protocol the other ranks follow."""
