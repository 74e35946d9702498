"""Trainer loop, optimizer + LR schedule, metrics and plots."""
