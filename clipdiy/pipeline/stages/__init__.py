"""Doing it: the Ray Data plan and its stages (decode, inference, rows, writer), placement, the attempt ledger."""
