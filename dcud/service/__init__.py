"""Policy: line ownership, polling, bridging, outbox, uplinks, alarms, drives."""
