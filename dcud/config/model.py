"""The ``dcud.toml`` model: frozen typed structs (msgspec), unknown keys rejected.

Names here are the contract of design.md section 3: add fields, never rename. Every field has a
default where a sensible one exists, so a minimal installation file stays short.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Framing = Annotated[str, msgspec.Meta(pattern=r"^[5-8][NEOMS][12]$")]
Baud = Literal[300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200]


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Common options of every section: immutable, unknown keys are errors."""


class MqttConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The monitoring/steering MQTT uplink (design.md section 6)."""

    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "dcu/{device_id}"
    client_id: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60
    inflight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 32
    status_interval_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    reconnect_max_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 60.0
    clean_session: bool = False
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    """MQTT version: auto tries 5 (broker-side Maximum Packet Size, retain flags as published) and falls
    back to 3.1.1 when the broker refuses it."""


class RemoteConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Remote commands (``<p>/cmd/<verb>``): who may change what, and the bounds of the command path.

    docs/remote-config.md ("MQTT commands"). dcud.toml itself is never changed remotely.
    """

    plain_param_set: bool = False
    """Accept ``param/set`` and the other state-changing commands (``restart``, ``reboot``) without an
    envelope. Even then, parameters that decide who can reach or control the DCU (``fw_server_*``,
    ``ei_client_*``, ``tm.*`` TLS/verify, ``dm.*``, ``snmp_*``, ``com_ping_host``) change only in an
    envelope (or in the files on the DCU)."""
    reboot: Literal["logind", "command", "none"] = "logind"
    """How ``cmd/reboot`` reboots the DCU: ``logind`` (systemd-logind's D-Bus
    ``org.freedesktop.login1.Manager.Reboot``, through ``busctl``; permitted by polkit, see
    docs/systemd.md), ``command`` (run ``reboot_command``), ``none`` (refused)."""
    reboot_command: Annotated[
        tuple[Annotated[str, msgspec.Meta(min_length=1)], ...], msgspec.Meta(max_length=16)
    ] = ()
    """``reboot = "command"``: the program (absolute path) and its arguments, run without a shell."""
    reboot_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    """Bound of each reboot step (the permission check, the reboot call)."""
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 64 * 1024
    """Largest command message; bigger ones are dropped before they are queued (MQTT 5: by the broker)."""
    max_queued_requests: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    """Incoming command messages waiting to be read; more are dropped (counted)."""
    max_depth: Annotated[int, msgspec.Meta(ge=2, le=64)] = 8
    """Deepest JSON nesting of a request (objects and arrays)."""
    dedupe_window_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 600.0
    """A state-changing request repeating an ``id`` within this is answered from the first reply."""
    dedupe_max_entries: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 256
    """Remembered ids at most (oldest forgotten first)."""


class OutboxConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Bounds of the crash-safe outbox (design.md section 7)."""

    max_bytes: Annotated[int, msgspec.Meta(ge=65536)] = 64 * 1024 * 1024
    max_age_s: Annotated[float, msgspec.Meta(gt=0)] = 30 * 86400.0
    policy: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    high_water_ratio: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.8


class LineConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One physical serial line; exactly one owner (the line service) talks on it."""

    name: Name
    device: Annotated[str, msgspec.Meta(min_length=1)]
    kind: Literal["rs232", "rs485", "mbus"] = "rs485"
    baud: Baud | None = None
    framing: Framing | None = None
    transparent: Literal["primary", "secondary"] | None = None
    echo_filter: bool = False
    rs485_rts_on_send: bool = True
    reopen_max_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 60.0

    @property
    def effective_baud(self) -> int:
        """Baud in force: M-Bus lines default to 2400, IEC 62056-21 sign-on to 300."""
        if self.baud is not None:
            return self.baud
        return 2400 if self.kind == "mbus" else 300

    @property
    def effective_framing(self) -> str:
        """Framing in force: 8E1 for M-Bus, 7E1 (IEC 62056-21) otherwise."""
        if self.framing is not None:
            return self.framing
        return "8E1" if self.kind == "mbus" else "7E1"


HexKey = Annotated[str, msgspec.Meta(pattern=r"^$|^[0-9A-Fa-f]{32}$")]
"""An AES-128 key as 32 hex digits (empty: not set)."""
DLMS_SECRET_FIELDS = frozenset({"password", "block_cipher_key", "authentication_key"})


class DlmsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[meter.dlms]``: how dcud associates with a DLMS/COSEM meter and what it reads (docs/dlms.md,
    "Meters in dcud.toml, readings, backfill, clock"). Cross-field rules are checked by
    :mod:`dcud.config.dlms` (file:line: key errors)."""

    client: Annotated[int, msgspec.Meta(ge=1, le=127)] = 16
    """Client SAP: 16 public, 32 reading (LLS) and 1 management (HLS) by common convention."""
    logical_device: Annotated[int, msgspec.Meta(ge=0, le=16383)] = 1
    """The server's logical device: upper HDLC address, wrapper destination wPort (1 = management)."""
    auth: Literal["none", "lls", "hls-gmac"] = "none"
    password: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """LLS password (a secret)."""
    security: Literal["none", "authenticated", "encrypted", "authenticated-encrypted"] = "none"
    """Suite 0 global ciphering of every APDU."""
    block_cipher_key: HexKey = ""
    """Global unicast encryption key EK (a secret); or ``key_file``."""
    authentication_key: HexKey = ""
    """Authentication key AK (a secret); or ``key_file``."""
    key_file: str = ""
    """TOML or JSON file with ``block_cipher_key`` and ``authentication_key`` (relative to dcud.toml)."""
    system_title: Annotated[str, msgspec.Meta(pattern=r"^$|^[0-9A-Fa-f]{16}$")] = ""
    """dcud's own system title (16 hex digits); empty: ``DCU`` and 5 bytes derived from device_id."""
    mode_e: bool = False
    """IEC 62056-21 sign-on at the line's rate, then HDLC at the rate the meter offers (max_baud caps it)."""
    iec_address: Annotated[str, msgspec.Meta(max_length=32)] = ""
    """Mode E: the IEC device address of the sign-on (empty: the general request ``/?!``)."""
    objects: list[Annotated[str, msgspec.Meta(max_length=64)]] = msgspec.field(default_factory=list)
    """Read each interval: OBIS (class and attribute from the object list) or ``class/OBIS/attribute``."""
    profile: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The load profile (class 7) read by range and backfilled; empty: none."""
    profile_backfill_s: Annotated[int, msgspec.Meta(ge=0, le=400 * 86400)] = 86400
    """First contact (no cursor yet): read the profile and event logs from this long ago."""
    event_logs: list[Annotated[str, msgspec.Meta(max_length=64)]] = msgspec.field(default_factory=list)
    """Event logs (class 7) whose new entries become ``meter_event`` events."""
    clock_sync: Literal["off", "report", "set"] = "report"
    max_drift_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 10.0
    """clock_sync = set: correct the meter's clock when it is off by more than this (and NTP is synced)."""

    def __repr__(self) -> str:
        # Passwords and keys are secrets: never in a repr (and so never in a log line or traceback).
        shown = (
            f"{name}={'***' if name in DLMS_SECRET_FIELDS and value else repr(value)}"
            for name, value in ((name, getattr(self, name)) for name in self.__struct_fields__)
        )
        return f"DlmsConfig({', '.join(shown)})"


class MeterConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One meter on a line (or, DLMS only, on TCP: ``host``)."""

    name: Name
    line: str = ""
    """The ``[[line]]`` it hangs on; required except for a DLMS meter reached over TCP (``host``)."""
    protocol: Literal["iec62056-21", "mbus", "dlms"]
    host: Annotated[str, msgspec.Meta(max_length=300)] = ""
    """DLMS over the TCP wrapper: ``"ip:port"`` (``[v6]:port``, port 4059 by default); not with ``line``."""
    address: Annotated[str, msgspec.Meta(max_length=32)] = ""
    interval_s: Annotated[int, msgspec.Meta(ge=10, le=86400)] | None = None
    timeout_s: PositiveSeconds | None = None
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    bcc: Literal["xor", "sum7", "none"] = "xor"
    max_baud: Baud | None = None
    enabled: bool = True
    dlms: DlmsConfig | None = None
    """``[meter.dlms]``, only with ``protocol = "dlms"`` (absent: every default)."""


class CanConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One CAN bus (python-can interface name and channel)."""

    name: Name
    interface: Annotated[str, msgspec.Meta(min_length=1)] = "socketcan"
    channel: Annotated[str, msgspec.Meta(min_length=1)] = "can0"
    bitrate: Annotated[int, msgspec.Meta(ge=10000, le=1000000)] = 500000
    options: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)


class ModbusRegisters(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Holding-register map of a Modbus RTU drive (0-based register addresses)."""

    status: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    position: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    velocity: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    fault: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    io: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    control: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    function: Literal["holding", "input"] = "holding"
    """Which table the status/position/velocity/fault/io registers are read from (control is holding)."""
    word_order: Literal["big", "little"] = "big"
    """32-bit values: "big" = high word at the lower address."""
    position_words: Literal[1, 2] = 2
    velocity_words: Literal[1, 2] = 2


class TpdoConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A TPDO of a CANopen drive as configured, instead of its mapping being read from the drive."""

    number: Annotated[int, msgspec.Meta(ge=1, le=4)]
    objects: list[
        Annotated[str, msgspec.Meta(pattern=r"^(0x)?[0-9A-Fa-f]{4}(:(0x)?[0-9A-Fa-f]{1,2})?(/[0-9]{1,2})?$")]
    ]
    """Mapped objects in order: ``"6041"``, ``"6064:00"``, ``"2000:01/16"`` (length in bits after ``/``)."""
    cob_id: Annotated[int, msgspec.Meta(ge=1, le=0x7FF)] | None = None
    """Default: the predefined connection set (0x180 + 0x100 * (number - 1) + node_id)."""

    def __post_init__(self) -> None:
        from dcud.codec.canopen import parse_object_ref
        from dcud.errors import ProtocolError

        try:
            bits = sum(parse_object_ref(ref).bits for ref in self.objects)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        if not self.objects or bits > 64:
            raise ValueError(f"a TPDO maps 1..64 bits of objects, got {bits}")


class DriveConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One servo drive on a CAN bus (CANopen) or a serial line (Modbus RTU)."""

    name: Name
    bus: str
    protocol: Literal["canopen", "modbus-rtu"]
    node_id: Annotated[int, msgspec.Meta(ge=1, le=247)]
    commands: bool = False
    poll_interval_s: Annotated[float, msgspec.Meta(ge=0.01, le=3600)] = 1.0
    heartbeat_timeout_s: PositiveSeconds | None = None
    history_interval_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    registers: ModbusRegisters = msgspec.field(default_factory=ModbusRegisters)
    state_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=3600)] = 1.0
    """Least gap between two state messages caused by position/velocity alone (state changes go at once)."""
    timeout_s: PositiveSeconds | None = None
    """SDO (CANopen) or response (Modbus) timeout; default 1.0 s and 0.5 s."""
    tpdo: list[TpdoConfig] = msgspec.field(default_factory=list)
    """CANopen: TPDO mapping as configured; empty: read from the drive (1800+/1A00+)."""
    baud: Baud | None = None
    """Modbus RTU: rate for this drive's transactions (default: the line's)."""
    framing: Framing | None = None
    """Modbus RTU: framing for this drive's transactions (default: the line's)."""
    writable: list[Annotated[str, msgspec.Meta(max_length=16)]] = msgspec.field(default_factory=list)
    """What ``drive/write`` may write (empty, the default: nothing). CANopen: objects ``"6060"`` (every
    sub-index) or ``"607A:00"`` (hex); Modbus RTU: holding registers ``"40"`` or ranges ``"40-47"``
    (0-based, decimal). The controlword/control register is never writable this way."""

    def __post_init__(self) -> None:
        pattern = WRITABLE_OBJECT if self.protocol == "canopen" else WRITABLE_REGISTERS
        example = '"6060" or "607A:00" (hex)' if self.protocol == "canopen" else '"40" or "40-47" (decimal)'
        for entry in self.writable:
            match = re.fullmatch(pattern, entry)
            if match is None or (self.protocol != "canopen" and not _register_range_ok(entry)):
                raise ValueError(f'writable: "{entry}" is not {example} for a {self.protocol} drive')


WRITABLE_OBJECT = r"(0x)?[0-9A-Fa-f]{4}(:(0x)?[0-9A-Fa-f]{1,2})?"
"""A CANopen ``[[drive]] writable`` entry: index, optional sub-index, hex."""
WRITABLE_REGISTERS = r"[0-9]{1,5}(-[0-9]{1,5})?"
"""A Modbus ``[[drive]] writable`` entry: a register or an inclusive range, decimal, 0-based."""


def _register_range_ok(entry: str) -> bool:
    first, _, last = entry.partition("-")
    low, high = int(first), int(last or first)
    return low <= high <= 65535


class PowerConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The DC power-fail input."""

    source: Literal["none", "file", "gpio"] = "none"
    path: str = ""
    chip: str = "/dev/gpiochip0"
    gpio_line: Annotated[int, msgspec.Meta(ge=0)] = 0
    active_low: bool = False
    poll_interval_s: Annotated[float, msgspec.Meta(ge=0.005, le=10)] = 0.02
    """How often the file (or, without edge events, the GPIO line) is read."""
    debounce_s: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.05
    """A new level counts once it has been stable this long (flapping faster than this is ignored)."""
    budget_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    """Time budget of the last-gasp sequence after detection (commit, trap, MQTT, event push)."""


class InputConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One digital input (a door contact, a tamper switch...): read like ``[power]``, raises
    ``input_change`` (dcud.service.inputs, docs/alarms-and-time.md)."""

    name: Name
    source: Literal["file", "gpio"]
    path: str = ""
    """``source = "file"``: a sysfs-style file holding an integer (non-zero = high)."""
    chip: str = "/dev/gpiochip0"
    gpio_line: Annotated[int, msgspec.Meta(ge=0)] = 0
    active_low: bool = False
    """Invert the level: with a contact to ground and a pull-up, closed reads low and counts as active."""
    poll_interval_s: Annotated[float, msgspec.Meta(ge=0.005, le=10)] = 0.05
    """How often the file (or, without edge events, the GPIO line) is read."""
    debounce_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.1
    """A new level counts once it has been stable this long (flapping faster than this is ignored)."""


LedName = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^$|^(?!\.\.?$)[^/\x00]+$")]


class LedsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where the WM-E LEDs ``led1``..``led6`` are: LED class devices under ``root`` (dcud.service.outputs)."""

    root: str = "/sys/class/leds"
    """The LED class directory (a test points it at a temporary tree)."""
    led1: LedName = "led1"
    """The Linux LED name (a directory under ``root``) that is WM-E LED 1; empty: not wired."""
    led2: LedName = "led2"
    led3: LedName = "led3"
    led4: LedName = "led4"
    led5: LedName = "led5"
    led6: LedName = "led6"

    def names(self) -> dict[str, str]:
        """WM-E LED parameter name -> Linux LED name (empty: not wired)."""
        return {
            "led1": self.led1,
            "led2": self.led2,
            "led3": self.led3,
            "led4": self.led4,
            "led5": self.led5,
            "led6": self.led6,
        }


class RelayConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The relay output that ``em_relay`` drives (dcud.service.outputs)."""

    source: Literal["none", "file", "gpio"] = "none"
    """none: this DCU has no relay; file: a sysfs-style value file (``1``/``0`` written); gpio: a line."""
    path: str = ""
    chip: str = "/dev/gpiochip0"
    gpio_line: Annotated[int, msgspec.Meta(ge=0)] = 0
    active_low: bool = False
    """The relay is energised by a low level."""


class SnmpConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """SNMP settings that the WM-E snmp_* parameters do not cover (dcud.service.snmp)."""

    engine_id: Annotated[str, msgspec.Meta(pattern=r"^$|^(0[xX])?([0-9A-Fa-f]{2}:?){5,32}$")] = ""
    """SNMPv3 engine ID as hex (``0x80007ed905...``); empty: derived from device_id, stable."""
    enterprise_oid: Annotated[str, msgspec.Meta(pattern=r"^1\.3\.6\.1\.4\.1\.[0-9]+(\.[0-9]+)*$")] = (
        "1.3.6.1.4.1.32473"
    )
    """DCUD-MIB's root; the default is the RFC 5612 documentation PEN, a placeholder."""
    agent_listen: Annotated[
        str, msgspec.Meta(pattern=r"^$|^([0-9]{1,3}(\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$")
    ] = ""
    """``host:port`` (``[v6]:port``) of the read-only SNMP agent (dcud.service.snmp_agent); empty: off."""
    agent_community: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[\x21-\x7e]*$")] = ""
    """SNMPv2c read-only community of the agent (a secret); empty: no v2c (v3 only)."""
    agent_max_message_bytes: Annotated[int, msgspec.Meta(ge=484, le=65507)] = 1472
    """Largest response datagram (RFC 3417's minimum is 484; 1472 fits an Ethernet frame unfragmented)."""
    agent_max_requests_per_s: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100
    """Datagrams the agent handles per second (bursts of twice as many); more are dropped, counted."""
    inform: bool = False
    """Send alarms as acknowledged INFORMs (the last gasp stays a trap)."""
    inform_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    """Resends of an unacknowledged INFORM before it counts as failed."""
    inform_timeout_s: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 5.0
    """Wait for an INFORM's acknowledgement before resending it."""

    def __repr__(self) -> str:
        # agent_community is a password: never in a repr (and so never in a log line or traceback).
        shown = (
            f"{name}={'***' if name == 'agent_community' and value else repr(value)}"
            for name, value in ((name, getattr(self, name)) for name in self.__struct_fields__)
        )
        return f"SnmpConfig({', '.join(shown)})"


class NtpConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """NTP client policy; server, port, interval and timeout are WM-E parameters (dcud.service.ntp)."""

    step_clock: bool = False
    """Step the system clock when no time daemon owns it (needs CAP_SYS_TIME, see systemd drop-in)."""
    step_threshold_s: Annotated[float, msgspec.Meta(ge=0.001, le=86400)] = 0.5
    max_delay_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.5
    """Round-trip delays above this are rejected as insane."""
    max_offset_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 1.0
    """The clock counts as synchronised only while |offset| is below this."""
    unsync_after: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    """Failed or rejected queries in a row before the clock is reported unsynchronised."""


class WatchdogConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Connectivity watchdog and daily restart options beyond the WM-E parameters."""

    probe: Literal["auto", "icmp", "tcp"] = "auto"
    """auto: unprivileged ICMP echo, TCP connect when ICMP sockets are not permitted."""
    tcp_port: Port = 443
    """Port of the TCP connect probe (a refused connection also proves reachability)."""
    restart_min_uptime_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 600.0
    """A daily restart never happens sooner than this after start (the next day's is taken)."""


class DataPushConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Data push options beyond the WM-E datapush_* parameters (dcud.service.datapush, docs/push.md)."""

    period_s: Annotated[float, msgspec.Meta(ge=0.05, le=86400)] | None = None
    """Overrides ``datapush_periodic`` (tests, demos); aligned to the clock the same way."""
    batch_items: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 1000
    """Readings per FTP file set and per MQTT push attempt (a catch-up is many of them, in order)."""
    mqtt_inflight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 200
    """MQTT push: QoS 1 messages awaiting PUBACK at once."""
    ca_file: str = ""
    """TLS (ftps://, mqtts://): trusted CAs; empty: the system store."""
    cert_file: str = ""
    key_file: str = ""
    tls_verify: bool = True
    """Verify the push server's certificate and host name."""


class ConfigPortConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The config/firmware port (``fw_server_port``): where it listens, its limits (docs/remote-config.md)."""

    enabled: bool = True
    listen: Annotated[str, msgspec.Meta(pattern=r"^(auto|loopback|any|[0-9A-Fa-f:.]{2,45})$")] = "auto"
    """auto: every interface when ``fw_server_encrypt=1``, else 127.0.0.1 only; loopback; any; an IP."""
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024
    """Largest parameter file upload (a whole WM-E file is a few KiB)."""
    max_firmware_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024 * 1024)] = 64 * 1024 * 1024
    header_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    """The request line and headers must arrive within this."""
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0
    """A whole config request (headers and body) must arrive within this."""
    firmware_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 1800.0
    """A whole firmware upload must arrive within this."""
    replay_window_s: Annotated[float, msgspec.Meta(ge=10, le=86400)] = 300.0
    """Encrypted uploads: accepted timestamp window (crypto_envelope.ReplayGuard)."""
    plain_writes: bool = False
    """Without ``fw_server_encrypt=1``: accept ``PUT``/``PATCH /config`` and ``PUT /firmware`` (reads are
    always served). Off by default: a plain write is refused with 403. The installer's opt-in only."""
    max_connections_per_source: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    """Connections at once from one source address (an IPv6 source counts per /64); more get 503."""
    min_body_rate_bytes_s: Annotated[int, msgspec.Meta(ge=1, le=100 * 1024 * 1024)] = 1024
    """A request body must bring at least ``min_body_rate_bytes_s * body_rate_window_s`` bytes in every
    ``body_rate_window_s`` (or end), else 408: slow clients cannot hold a slot for ``firmware_timeout_s``."""
    body_rate_window_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    """The window of the body rate bound; also the longest a body may stall."""


class TransparentConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Transparent ports and EI client: session policy beyond the WM-E parameters (docs/bridge.md)."""

    listen: Annotated[str, msgspec.Meta(pattern=r"^(auto|loopback|any|[0-9A-Fa-f:.]{2,45})$")] = "auto"
    """auto: every interface when the port serves TLS (tm.tls_enable=1), else 127.0.0.1; loopback; any; IP."""
    allow: list[Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Fa-f:.]{2,45}(/[0-9]{1,3})?$")]] = msgspec.field(
        default_factory=list
    )
    """Source addresses/networks (CIDR) allowed to connect; empty: any. Others are dropped before TLS."""
    second_client: Literal["takeover", "refuse"] = "takeover"
    """A new client while a session runs: takeover ends the old one only when the new client proves the
    same identity (client certificate subject and issuer, else source address); everybody else, and
    everybody with refuse, gets ``busy_message`` and is closed."""
    busy_message: Annotated[str, msgspec.Meta(max_length=200)] = "BUSY transparent port in use\r\n"
    idle_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 300.0
    """A session without a byte either way for this long is closed (0 = never)."""
    lease_idle_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    """An idle session gives the line to waiting scheduled readouts after this; it takes it back on data."""
    lease_max_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 900.0
    """A session that held the line this long while readouts wait is ended (0 = never)."""
    lease_wait_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 120.0
    """A session that cannot get its line within this is closed (line down or busy)."""
    keepalive_idle_s: Annotated[int, msgspec.Meta(ge=1, le=7200)] = 60
    keepalive_interval_s: Annotated[int, msgspec.Meta(ge=1, le=600)] = 10
    keepalive_count: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    unsent_timeout_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    """Dead-peer bound on unsent data: unacknowledged (TCP_USER_TIMEOUT) or unread by the client this long."""
    handshake_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    max_pending: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    """Connections in TLS handshake or being admitted at once; more are dropped at once (counted)."""
    max_pending_per_source: Annotated[int, msgspec.Meta(ge=1, le=256)] = 2
    """Of those, at most this many from one source (IPv4 address, IPv6 /64); more are dropped (counted)."""
    iec_aware: bool = True
    """Follow IEC 62056-21 mode C/E baud (and framing) switches of the client's sign-on."""
    iec_inactivity_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 120.0
    """Programming/HDLC sessions without traffic this long: the meter is back at its initial speed."""
    rfc2217: bool = False
    """The tm ports speak Telnet RFC 2217 (the client sets rate and framing) instead of raw TCP."""
    trace_file: str = ""
    """Hex trace of every session, ``{port}`` replaced by tm/tm2/ei; relative to state_dir; empty: off."""
    trace_max_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 30)] = 16 * 1024 * 1024
    """A trace file is rotated to ``.1`` at this size (two files at most)."""
    ei_login_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    ei_reconnect_max_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 300.0
    ei_tls: bool = False
    """The EI client connects with TLS (our certificate from bank ``tm.cert`` when set)."""
    ei_tls_verify: Literal["mandatory", "none"] = "mandatory"
    """EI server certificate: verified (chain against bank ``tm.ca_cert``, else the system trust store,
    and the host name) or not at all; the EI password is never sent to an unverified server."""


class DcudToml(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole ``dcud.toml`` file."""

    device_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None
    parameters: str = "wme.conf"
    state_dir: str = "/var/lib/dcud"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    timezone: str = ""
    grace_s: Annotated[float, msgspec.Meta(ge=0.1, le=120)] = 5.0
    mqtt: MqttConfig | None = None
    remote: RemoteConfig = msgspec.field(default_factory=RemoteConfig)
    outbox: OutboxConfig = msgspec.field(default_factory=OutboxConfig)
    line: list[LineConfig] = msgspec.field(default_factory=list)
    meter: list[MeterConfig] = msgspec.field(default_factory=list)
    can: list[CanConfig] = msgspec.field(default_factory=list)
    drive: list[DriveConfig] = msgspec.field(default_factory=list)
    power: PowerConfig = msgspec.field(default_factory=PowerConfig)
    input: list[InputConfig] = msgspec.field(default_factory=list)
    leds: LedsConfig | None = None
    """Absent: this DCU's LEDs are not WM-E LEDs (``led1``..``led6`` have no effect); an empty ``[leds]``
    takes the default names. The ``outputs`` service runs only with ``[leds]`` or a ``[relay]`` source."""
    relay: RelayConfig = msgspec.field(default_factory=RelayConfig)
    snmp: SnmpConfig = msgspec.field(default_factory=SnmpConfig)
    ntp: NtpConfig = msgspec.field(default_factory=NtpConfig)
    watchdog: WatchdogConfig = msgspec.field(default_factory=WatchdogConfig)
    datapush: DataPushConfig = msgspec.field(default_factory=DataPushConfig)
    config_port: ConfigPortConfig = msgspec.field(default_factory=ConfigPortConfig)
    transparent: TransparentConfig = msgspec.field(default_factory=TransparentConfig)
