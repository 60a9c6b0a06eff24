"""dcud: the daemon of a Data Concentrator Unit (meters, drives, uplinks, alarms)."""

__version__ = "0.1.0"
