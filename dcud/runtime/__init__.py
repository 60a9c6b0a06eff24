"""Supervisor, sd_notify, signals, backoff, clock and the in-process event bus."""
