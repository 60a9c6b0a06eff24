"""Asyncio byte and frame movers (serial, TCP, UDP, CAN) with no protocol knowledge."""
