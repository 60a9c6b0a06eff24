"""Field-device simulators speaking the real protocols (demo, tests, field checks)."""
