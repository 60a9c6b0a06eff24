"""The WM-E8S parameter catalogue: one entry per row of the seed table, in seed order.

Source: ``../shared/seeds/000_c032507ce4234a0b.txt`` (WM-E8S parameter description v2.60, v5.x firmware),
text extracted from a PDF. How the rows were read:

- ``group`` is the seed's "WM-E Term Parameter Group" carried forward from the row that names it. For
  the rows from ``eventpush_sms_text`` to ``com_dis_apn_pass`` the extracted text has no group column at
  all, so the group carried forward is ``AMM (EC)``.
- ``default`` is the seed's default exactly as a file would hold it, ``None`` where the seed says ``-``.
  Where the seed's default cannot be what it says, ``note`` records the interpretation.
- ``description`` is the seed's customer description with whitespace collapsed, HTML tags removed and
  typographic quotes made plain (and the seed's "Yves" read as "Yes"); for a few rows whose
  description cell belongs to another row, the comment cell is used (``note`` says so).
- ``kind``, ``unit``, ``allowed``, ``minimum``, ``maximum``, ``support``, ``secret`` and ``note`` are dcud's
  decisions; ``dcud.config.wme_param.Kind`` documents what each kind accepts and yields.
  ``minimum``/``maximum`` are in the file's unit (``seed_unit``), or bound the length for text kinds.

This module is data only; ``dcud.config.wme`` builds the typed ``CATALOGUE`` from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalogue row as plain data (``kind`` and ``support`` are the enum values as strings)."""

    name: str
    group: str
    term: str
    default: str | None
    unit: str
    seed_unit: str
    kind: str
    support: str
    note: str
    description: str
    allowed: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False


LED_NOTE = (
    "The seed has no list of LED meanings; the codes are dcud's: 0 off, 1 on, 2 uplink reachable, "
    "3 clock synchronised, 4 every meter ok, 5 alarm (power lost or an input active); other codes leave "
    "the LED to its kernel trigger. Applied where dcud.toml has a [leds] table, to the Linux LED it names "
    "under its root (default /sys/class/leds/ledN); reported as not present where there is none (leds state)."
)

ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="ei_client_type",
        group="AMM (EC)",
        term="EI client username",
        default=None,
        unit="",
        seed_unit="username (text, numbers)",
        kind="text",
        support="applied",
        minimum=1,
        maximum=64,
        note=(
            "The name says 'type' but the seed describes the EI client username; dcud uses it as the "
            "username for ei_client_auth_mode=E."
        ),
        description="Define the EI client's username for the connection IP address.",
    ),
    Entry(
        name="ei_client_pass",
        group="AMM (EC)",
        term="EI client password",
        default=None,
        unit="",
        seed_unit="password",
        kind="password",
        support="applied",
        minimum=1,
        maximum=64,
        secret=True,
        note="",
        description="Define the EI client's password for the username of the connection IP address.",
    ),
    Entry(
        name="ei_client_addr",
        group="AMM (EC)",
        term="IP address",
        default=None,
        unit="",
        seed_unit="IP address",
        kind="host",
        support="applied",
        note="Seed: IP address; dcud also accepts a DNS name. Unset: the EI client is off.",
        description=(
            "Here you can define the remote server's IP address where the data will be transmitted "
            "through the wireless networks."
        ),
    ),
    Entry(
        name="ei_client_auth_mode",
        group="AMM (EC)",
        term="EI client authentication mode",
        default=None,
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("N", "E"),
        note="N = no authentication, E = username/password (ei_client_type, ei_client_pass).",
        description=(
            "A remote device can be connected to the modem and readout data - here you can select "
            "authentication mode. Values: N - no authentication E - E authentication - you have to "
            "define the username / password"
        ),
    ),
    Entry(
        name="ei_client_port",
        group="AMM (EC)",
        term="Server port",
        default="0",
        unit="",
        seed_unit="Port number",
        kind="port",
        support="applied",
        minimum=0,
        maximum=65535,
        note="0 = EI client off.",
        description="Define the port number of the server IP address.",
    ),
    Entry(
        name="ei_client_deployed",
        group="AMM (EC)",
        term="Auto register",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, nothing more."
        ),
        description="In case of data push send automatically or not 0 = false, 1 = true * Not used",
    ),
    Entry(
        name="ei_client_interval_fast",
        group="AMM (EC)",
        term="Poll interval fast (not deployed)",
        default="30",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="accepted",
        minimum=1,
        maximum=86400,
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, nothing more."
        ),
        description="Value of Poll interval fast (not deployed) * Not used",
    ),
    Entry(
        name="ei_client_interval_slow",
        group="AMM (EC)",
        term="Poll interval slow (deployed)",
        default="30",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="accepted",
        minimum=1,
        maximum=86400,
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, nothing more."
        ),
        description="Value of Poll interval slow (deployed) * Not used",
    ),
    Entry(
        name="ei_client_top_keepalive",
        group="AMM (EC)",
        term="EI client TCP keep alive",
        default="10",
        unit="s",
        seed_unit="minutes",
        kind="minutes",
        support="applied",
        minimum=0,
        maximum=1440,
        note="TCP keepalive of the EI client connection; 0 = keepalive off.",
        description="Keep the E client connection alive for the defined time range",
    ),
    Entry(
        name="eventpush_addr",
        group="AMM (EC)",
        term="Event push address",
        default=None,
        unit="",
        seed_unit="Phone nr. Or IP address",
        kind="phone-or-ip",
        support="applied",
        note=(
            "A phone number in international format (+ and 3..15 digits) selects SMS, which needs a "
            "modem; dcud pushes events to an IP address or DNS name."
        ),
        description=(
            "Add the notification phone number or IP address to the Event push address field in "
            "international format."
        ),
    ),
    Entry(
        name="eventpush_sms_text",
        group="AMM (EC)",
        term="Event push notification text",
        default="Input changed",
        unit="",
        seed_unit="text",
        kind="text",
        support="applied",
        minimum=1,
        maximum=160,
        note="",
        description="Add the notification text for input signal change detection event.",
    ),
    Entry(
        name="eventpush_sms_ignore",
        group="AMM (EC)",
        term="Event push notification ignore until [sec]",
        default=None,
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=0,
        maximum=86400,
        note="",
        description=("Event push notification sending will be ignored/postponed until the declared interval"),
    ),
    Entry(
        name="eventpush_sms_notify",
        group="AMM (EC)",
        term="Event push event notification type",
        default="1",
        unit="",
        seed_unit="SELECTION",
        kind="bitmask",
        support="applied",
        allowed=("1", "2", "4", "8"),
        note=(
            "Seed default is the label 'Last GsmP', read as its value 1. The values are powers of "
            "two, so dcud reads the field as a bit mask: any sum of 1 (Last GsmP), 2 (input change), "
            "4 (CDMA), 8 (debug)."
        ),
        description="1=Last GsmP, 2=Input change, 4=CDMA, 8=Debug",
    ),
    Entry(
        name="eventpush_sms_lost_text",
        group="AMM (EC)",
        term="Event push Power Loss notification",
        default="Power loss",
        unit="",
        seed_unit="text",
        kind="text",
        support="applied",
        minimum=1,
        maximum=160,
        note="",
        description="Add the alarm notification text for occurred power loss detection event.",
    ),
    Entry(
        name="eventpush_sms_return_text",
        group="AMM (EC)",
        term="Event push Power Return notification",
        default="Power return",
        unit="",
        seed_unit="text",
        kind="text",
        support="applied",
        minimum=1,
        maximum=160,
        note="",
        description="Add the alarm notification text for occurred power return detection event.",
    ),
    Entry(
        name="datapush_host",
        group="AMM (EC)",
        term="Data push host",
        default=None,
        unit="",
        seed_unit="ftp path/URL with credentials",
        kind="url",
        support="applied",
        allowed=("ftp", "ftps", "mqtt", "mqtts"),
        secret=True,
        note=(
            "URL scheme://user:password@host:port/path; schemes ftp, ftps (explicit TLS), mqtt, "
            "mqtts (path = topic prefix); see docs/push.md. Percent-encode @ : / # ? in user and "
            "password. Only the password part is secret."
        ),
        description=(
            "FTP server address and connection parameters - as protocol, IP address as user and password."
        ),
    ),
    Entry(
        name="datapush_iec_address",
        group="AMM (EC)",
        term="Data push IEC meter address",
        default=None,
        unit="",
        seed_unit="IP address",
        kind="iec-address",
        support="applied",
        note=(
            "Seed entry type says IP address and its text mixes in the FTP server; the term and "
            "comment make it the IEC 62056-21 device address of the source meter (1..32 printable "
            "characters, no / ? !)."
        ),
        description=(
            "FTP server IP address - usage: datapush_host + protocol://user:password@ftp.address:port "
            "The Data push (ftp) parameters are here if you wish to use the data push service for the "
            "modem (as Data push IEC address as the source meter address and the ftp server IP "
            "address (Data Push Host))."
        ),
    ),
    Entry(
        name="datapush_iec_readout_baudrate",
        group="AMM (EC)",
        term="Data push IEC readout speed",
        default=None,
        unit="baud",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("2400", "4800", "9600", "19200"),
        note="",
        description="Data push IEC readout baudrate Values: 2400, 4800, 9600, 19200",
    ),
    Entry(
        name="datapush_max_retries",
        group="AMM (EC)",
        term="Data push max retries",
        default="3",
        unit="",
        seed_unit="number",
        kind="number",
        support="applied",
        minimum=0,
        maximum=100,
        note="Seed: *Not in use on the WM-E; dcud applies it to data push retries.",
        description="Number of retries of data push operation in case of failure *Not in use",
    ),
    Entry(
        name="datapush_timeout",
        group="AMM (EC)",
        term="Data push timeout",
        default="15000",
        unit="s",
        seed_unit="milliseconds",
        kind="milliseconds",
        support="applied",
        minimum=1,
        maximum=600000,
        note=("Seed: *Not in use on the WM-E; dcud applies it as the data push connection timeout."),
        description=(
            "Interval of data / FTP push connection wait - it waits until the declared interval "
            "whether it was successful or not *Not in use"
        ),
    ),
    Entry(
        name="datapush_interval",
        group="AMM (EC)",
        term="Data push interval",
        default="86400",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=2592000,
        note="",
        description=(
            "Interval of next data / FTP push connection trying - the data push will be inactive "
            "until the interval spent and then it will try again (if Data push max retries was not "
            "exceeded)"
        ),
    ),
    Entry(
        name="datapush_retry_delay",
        group="AMM (EC)",
        term="Data push retry delay",
        default="60",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=86400,
        note="",
        description="Data push delay between retries. Value in seconds.",
    ),
    Entry(
        name="datapush_table_mask",
        group="AMM (EC)",
        term="Data push T1-T3 table mask",
        default="1",
        unit="",
        seed_unit="SELECTION",
        kind="bitmask",
        support="applied",
        allowed=("1", "16", "32"),
        note=(
            "Seed default is the label 'T1', read as its value 1. Seed values '1-T1, 16-T2, 33-T3': "
            "read as a bit mask of 1 (T1), 16 (T2), 32 (T3); the seed's 33 is then T1+T3 and also "
            "valid."
        ),
        description=("Data push - Mask for signing tariff tables to be pushed Values: 1-T1, 16-T2, 33-T3"),
    ),
    Entry(
        name="datapush_periodic",
        group="AMM (EC)",
        term="Data push cycle period",
        default="5",
        unit="s",
        seed_unit="minutes",
        kind="minutes",
        support="applied",
        allowed=("0", "1", "5", "10", "15", "30", "60", "1440"),
        note=(
            "Seed values 'table, 1 min, 5 min, 10 min, 15 min, 30 min, 1 hour, 1 day' written in "
            "minutes; 'table' is 0 (no fixed cycle, datapush_interval governs)."
        ),
        description=(
            "Data push period (cycle) - interval alternative in fixed format. Values: (table, 1 min, "
            "5 min, 10 min, 15 min, 30 min, 1 hour, 1 day)"
        ),
    ),
    Entry(
        name="datapush_prefix",
        group="AMM (EC)",
        term="Data push filename prefix",
        default=None,
        unit="",
        seed_unit="string",
        kind="filename-prefix",
        support="applied",
        note="1..32 characters from A-Z a-z 0-9 . _ - (it becomes part of a file name).",
        description="Data push file name prefix (etc. WM115)",
    ),
    Entry(
        name="ntp_address",
        group="AMM (EC)",
        term="NTP server IP address",
        default=None,
        unit="",
        seed_unit="IP address",
        kind="host",
        support="applied",
        note=(
            "Seed: IP address; dcud also accepts a DNS name. Two spellings are two parameters: ntp.* "
            "(v5 NETWORK PROTOCOLS group) and the legacy ntp_*. When both are set in the file, the "
            "dotted one is used."
        ),
        description="NTP server IP address",
    ),
    Entry(
        name="ntp_port",
        group="AMM (EC)",
        term="NTP server port",
        default=None,
        unit="",
        seed_unit="Port number",
        kind="port",
        support="applied",
        minimum=0,
        maximum=65535,
        note=(
            "Unset or 0 = 123. Two spellings are two parameters: ntp.* (v5 NETWORK PROTOCOLS group) "
            "and the legacy ntp_*. When both are set in the file, the dotted one is used."
        ),
        description="NTP server port number",
    ),
    Entry(
        name="ntp_interval",
        group="AMM (EC)",
        term="NTP synchronization interval",
        default="600",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=86400,
        note=(
            "Two spellings are two parameters: ntp.* (v5 NETWORK PROTOCOLS group) and the legacy "
            "ntp_*. When both are set in the file, the dotted one is used."
        ),
        description="NTP time sync interval. Value in seconds",
    ),
    Entry(
        name="ntp_timeout",
        group="AMM (EC)",
        term="NTP synchronization timeout",
        default="60",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=600,
        note=(
            "Two spellings are two parameters: ntp.* (v5 NETWORK PROTOCOLS group) and the legacy "
            "ntp_*. When both are set in the file, the dotted one is used."
        ),
        description="NTP time sync timeout. Value in seconds",
    ),
    Entry(
        name="ntp_timezone",
        group="AMM (EC)",
        term="NTP synchronization Time Zone (UTC +1:30; -1:30)",
        default=None,
        unit="s",
        seed_unit="SELECTION",
        kind="utc-offset",
        support="applied",
        note=(
            "Seed: 'UTC +1:30; -1:30'. Written [UTC]+H:MM or -H:MM, -12:00..+14:00 in 15-minute "
            "steps; typed value is the offset in seconds. Two spellings are two parameters: ntp.* (v5 "
            "NETWORK PROTOCOLS group) and the legacy ntp_*. When both are set in the file, the dotted "
            "one is used."
        ),
        description="NTP synchronization Time Zone (UTC +1:30; -1:30)",
    ),
    Entry(
        name="snmp_trap",
        group="AMM (EC)",
        term="SNMP trap if not receiving DC power",
        default=None,
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note="Unset = off.",
        description="*Only in case of using SNMP Manager",
    ),
    Entry(
        name="snmp_user",
        group="AMM (EC)",
        term="SNMP username",
        default=None,
        unit="",
        seed_unit="text",
        kind="text",
        support="applied",
        minimum=1,
        maximum=32,
        secret=True,
        note=(
            "SNMPv3 USM user name; with snmp_version=2 it is the community, a shared secret, so it is "
            "secret. No default: unset, dcud sends no trap (never the community 'public')."
        ),
        description="*Only in case of using SNMP Manager",
    ),
    Entry(
        name="snmp_auth_key",
        group="AMM (EC)",
        term="SNMP authentication key",
        default=None,
        unit="",
        seed_unit="text",
        kind="password",
        support="applied",
        minimum=8,
        maximum=64,
        secret=True,
        note=("Seed entry type is text; it is a key, so it is secret. USM needs at least 8 characters."),
        description="*Only in case of using SNMP Manager",
    ),
    Entry(
        name="snmp_priv_key",
        group="AMM (EC)",
        term="SNMP private key",
        default=None,
        unit="",
        seed_unit="text",
        kind="password",
        support="applied",
        minimum=8,
        maximum=64,
        secret=True,
        note=("Seed entry type is text; it is a key, so it is secret. USM needs at least 8 characters."),
        description="*Only in case of using SNMP Manager",
    ),
    Entry(
        name="snmp_manager_ip",
        group="AMM (EC)",
        term="SNMP manager IP",
        default="0",
        unit="",
        seed_unit="IP address",
        kind="ip",
        support="applied",
        note="0 (the default) = no manager: typed value None.",
        description="*Only in case of using SNMP Manager",
    ),
    Entry(
        name="snmp_manager_port",
        group="AMM (EC)",
        term="SNMP manager port",
        default="0",
        unit="",
        seed_unit="number",
        kind="port",
        support="applied",
        minimum=0,
        maximum=65535,
        note="Seed entry type is number; it is a UDP port. 0 = 162 (snmp-trap).",
        description="*Only in case of using SNMP Manager",
    ),
    Entry(
        name="snmp_version",
        group="AMM (EC)",
        term="SNMP version",
        default="3",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("2", "3"),
        note="Seed values '(2+V3)' read as 2 (v2c) and 3 (v3).",
        description="*Only in case of using SNMP Manager (2+V3)",
    ),
    Entry(
        name="snmp_auth_algo",
        group="AMM (EC)",
        term="SNMP authentication algorithm",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("0", "1", "2"),
        note=(
            "Seed values '(No authentication algorithm, 2+MD5, 2+SHA)': the '2+' are list artefacts; "
            "read as 0 = none, 1 = MD5, 2 = SHA."
        ),
        description="*Only in case of using SNMP Manager (No authentication algorithm, 2+MD5, 2+SHA)",
    ),
    Entry(
        name="snmp_priv_algo",
        group="AMM (EC)",
        term="SNMP private algorithm",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("0", "1", "2", "3"),
        note=(
            "Seed values '(No private algorithm, 2+DES, 2+3DES)': the '2+' are list artefacts; read "
            "as 0 = none, 1 = DES, 2 = 3DES. dcud adds 3 = AES-128 (RFC 3826), recommended: DES is "
            "broken and 3DES is a draft many managers (Net-SNMP) lack."
        ),
        description="*Only in case of using SNMP Manager (No private algorithm, 2+DES, 2+3DES)",
    ),
    Entry(
        name="com_apn_name",
        group="AMM (EC)",
        term="APN Name",
        default="wm2m",
        unit="",
        seed_unit="name (text, APN allowed chars)",
        kind="apn",
        support="accepted",
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="APN Name - ask your mobile operator for the GSM",
    ),
    Entry(
        name="com_apn_username",
        group="AMM (EC)",
        term="APN Username",
        default=None,
        unit="",
        seed_unit="name (text, APN allowed chars)",
        kind="text",
        support="accepted",
        minimum=1,
        maximum=64,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="APN Username - if you mobile operator / APN requires",
    ),
    Entry(
        name="com_apn_pass",
        group="AMM (EC)",
        term="APN Password",
        default=None,
        unit="",
        seed_unit="password",
        kind="password",
        support="accepted",
        minimum=1,
        maximum=64,
        secret=True,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="APN Password - if you mobile operator / APN requires",
    ),
    Entry(
        name="com_auto_user",
        group="AMM (EC)",
        term="Create APN username automatically",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, "
            "nothing more. Only 0 is implemented on the WM-E."
        ),
        description="0 = off implemented, 1 = not implemented in standard FW * Not used",
    ),
    Entry(
        name="com_auto_pass",
        group="AMM (EC)",
        term="Create APN password automatically",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, "
            "nothing more. Only 0 is implemented on the WM-E."
        ),
        description="0 = off implemented, 1 = not implemented in standard FW * Not used",
    ),
    Entry(
        name="com_apn_auth",
        group="AMM (EC)",
        term="APN preferred Authentication Protocol",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="accepted",
        allowed=("0", "1", "2", "3"),
        note=(
            "Seed values '0=NONE, 3=APN, 2=CHAP, 3=PPP / CHAP' list 3 twice; read as 0 = none, 1 = "
            "PAP, 2 = CHAP, 3 = PAP or CHAP. The OS owns the cellular modem on Linux "
            "(ModemManager/NetworkManager)."
        ),
        description="0=NONE, 3=APN, 2=CHAP, 3=PPP / CHAP",
    ),
    Entry(
        name="pdp_delay",
        group="AMM (EC)",
        term="PDP connection establishment delay (min)",
        default="0",
        unit="s",
        seed_unit="minutes",
        kind="minutes",
        support="accepted",
        minimum=0,
        maximum=1440,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="Delay",
    ),
    Entry(
        name="pdfoff_auth_user",
        group="AMM (EC)",
        term="PDP APN Name",
        default=None,
        unit="",
        seed_unit="READ ONLY",
        kind="text",
        support="read-only",
        note="Status value; name kept exactly as the seed spells it.",
        description="Status value",
    ),
    Entry(
        name="pdfoff_auth_pass",
        group="AMM (EC)",
        term="PDP APN Password",
        default=None,
        unit="",
        seed_unit="READ ONLY",
        kind="password",
        support="read-only",
        secret=True,
        note="Status value; a password, so it is secret.",
        description="Status value",
    ),
    Entry(
        name="lastimei",
        group="AMM (EC)",
        term="IMEI Address",
        default=None,
        unit="",
        seed_unit="READ ONLY",
        kind="text",
        support="read-only",
        note="Status value.",
        description="Status value",
    ),
    Entry(
        name="lasticc",
        group="AMM (EC)",
        term="ICC Identifies",
        default=None,
        unit="",
        seed_unit="READ ONLY",
        kind="text",
        support="read-only",
        note="Status value.",
        description="Status value",
    ),
    Entry(
        name="lastmodel",
        group="AMM (EC)",
        term="TELT module type",
        default=None,
        unit="",
        seed_unit="READ ONLY",
        kind="text",
        support="read-only",
        note="Status value.",
        description="Status value",
    ),
    Entry(
        name="lastrevision",
        group="AMM (EC)",
        term="TELT module firmware version",
        default=None,
        unit="",
        seed_unit="READ ONLY",
        kind="text",
        support="read-only",
        note="Status value.",
        description="Status value",
    ),
    Entry(
        name="snrp_always_on",
        group="AMM (EC)",
        term="GPRS is always ON",
        default="1",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description=(
            "Check in the field, if it was empty (if it's empty it will be always ON) Values: 1 = on, "
            "0=off value for triggering only"
        ),
    ),
    Entry(
        name="snrp_connect_on_timer",
        group="AMM (EC)",
        term="Connection timer",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description=(
            "Choose the Connection timer - only if you are not using the GPRS Always ON option (when "
            "it is disabled) Values: 1 = on, 0=off value"
        ),
    ),
    Entry(
        name="snrp_connect_start",
        group="AMM (EC)",
        term="Start GPRS connection [HH:MM:SS]",
        default="FFFFFFFF000000",
        unit="",
        seed_unit="HH:MM:SS",
        kind="dated-time",
        support="accepted",
        note=(
            "Seed default 'FFFFFFFFF00000' has nine F and five 0, but the text defines 8 hex digits "
            "of date ('FFFFFFFF' = any date) then HHMMSS; read as FFFFFFFF000000 (any date, "
            "00:00:00). The literal seed string is accepted as an alias of it. The OS owns the "
            "cellular modem on Linux (ModemManager/NetworkManager)."
        ),
        description=(
            'Schedule of starting the GPRS connection / data push First part "FFFFFFFF" - is the date '
            'Second part "000000" - is the HH:MM:SS time format'
        ),
    ),
    Entry(
        name="snrp_connect_interval",
        group="AMM (EC)",
        term="Additional delay interval before alarm push",
        default="0",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="accepted",
        minimum=0,
        maximum=86400,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description=(
            'Delay time interval definition in case of using "push" to give some delay for build-up '
            'the connection. Will be valid only if the "GPRS Always ON" parameter was set to 0'
        ),
    ),
    Entry(
        name="snrp_disconnect_delay",
        group="AMM (EC)",
        term="Hold time of GPRS connection",
        default="0",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="accepted",
        minimum=0,
        maximum=86400,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description='Will be valid only if the "GPRS Always ON" parameter was set to 0',
    ),
    Entry(
        name="tm_server_port",
        group="AMM (EC)",
        term="Port for transparent (IEC) meter readout",
        default="9000",
        unit="",
        seed_unit="Port number",
        kind="port",
        support="applied",
        minimum=1,
        maximum=65535,
        note="Must differ from fw_server_port and tm2.port (checked).",
        description=(
            "Define the Port for transparent (IEC) meter-readout. Note that must be different from "
            "the Download config and firmware port number"
        ),
    ),
    Entry(
        name="fw_server_port",
        group="AMM (EC)",
        term="Port for downloading the config and firmware",
        default="9001",
        unit="",
        seed_unit="Port number",
        kind="port",
        support="applied",
        minimum=1,
        maximum=65535,
        note="Must differ from tm_server_port and tm2.port (checked).",
        description=(
            "Define Port for download config and firmware. Note that must be different from "
            "Transparent IEC meter-readout port number"
        ),
    ),
    Entry(
        name="fw_server_key",
        group="AMM (EC)",
        term="AES-256 key for downloading the config and firmware",
        default=None,
        unit="",
        seed_unit="Key",
        kind="key",
        support="applied",
        secret=True,
        note=(
            "AES-256 key: 64 hex digits (the 32 key bytes) or exactly 32 printable ASCII characters "
            "(their bytes); see key_bytes(). Required when fw_server_encrypt=1 (checked)."
        ),
        description="Insert key if required",
    ),
    Entry(
        name="fw_server_encrypt",
        group="AMM (EC)",
        term="Use AES-256 CBC encryption",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note="",
        description="Enable the AES-256 encryption methodology if you want",
    ),
    Entry(
        name="com_max_retries",
        group="AMM (EC)",
        term="Number of GPRS connection attempts until module reset",
        default="15",
        unit="",
        seed_unit="number",
        kind="number",
        support="accepted",
        minimum=0,
        maximum=255,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="Number of maximum GPRS (PDP) connection attempts till module-reset",
    ),
    Entry(
        name="com_retry_delay_rewind",
        group="AMM (EC)",
        term="Waiting time until next try",
        default="1",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="accepted",
        minimum=0,
        maximum=86400,
        note=(
            "Seed: *not implemented on the WM-E. The OS owns the cellular modem on Linux "
            "(ModemManager/NetworkManager)."
        ),
        description=(
            "If the PDP context activation was not successful, then it will wait until for the "
            "defined interval to the re-activation If that reached the end of the Times(s) [secs] "
            'between "GPRS connection attempts" parameter value timeout, it goes back to the list, '
            "otherwise it is not used. * not implemented"
        ),
    ),
    Entry(
        name="com_encrypt_pass",
        group="AMM (EC)",
        term="Encrypt password via MD5 algorithm",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, nothing more."
        ),
        description="Encrypt password via MD5 algorithm Values: 0 = false, 1 = true * not used",
    ),
    Entry(
        name="com_retry_delay",
        group="AMM (EC)",
        term="Time(s) [secs] between GPRS connection attempts",
        default="15,15,300,15,15,300,15,15,3600",
        unit="s",
        seed_unit="seconds",
        kind="seconds-list",
        support="accepted",
        minimum=0,
        maximum=86400,
        note=(
            "Comma-separated seconds, 1..32 entries; typed value is a tuple of ints. The OS owns the "
            "cellular modem on Linux (ModemManager/NetworkManager)."
        ),
        description=(
            "If the PDP context activation was not successful, it will delay the reconnection "
            "according to the listing"
        ),
    ),
    Entry(
        name="com_ping_host",
        group="AMM (EC)",
        term="Watchdog Check IP address",
        default=None,
        unit="",
        seed_unit="IP address",
        kind="ip",
        support="applied",
        note="Seed: IPv4 address; dcud also accepts IPv6. Unset: the ping watchdog is off.",
        description="IPV4 address to ping (for checking the cellular connection health)",
    ),
    Entry(
        name="com_ping_max_retries",
        group="AMM (EC)",
        term="Number of ping retries",
        default="3",
        unit="",
        seed_unit="number",
        kind="number",
        support="applied",
        minimum=1,
        maximum=100,
        note="",
        description="Number of retries of checking the cellular network availability",
    ),
    Entry(
        name="com_ping_timeout",
        group="AMM (EC)",
        term="Ping wait-time (for next cycle)",
        default="15000",
        unit="s",
        seed_unit="milliseconds",
        kind="milliseconds",
        support="applied",
        minimum=100,
        maximum=600000,
        note=(
            "The seed gives this row the term of com_ping_interval; its description and "
            "com_reconnect_interval's text ('Ping wait-time [for reply]') make it the reply timeout "
            "of one ping."
        ),
        description="Timeout of ping interval (for checking the cellular network availability)",
    ),
    Entry(
        name="com_ping_interval",
        group="AMM (EC)",
        term="Ping wait-time (for next cycle)",
        default="86400",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=604800,
        note="",
        description=(
            "Interval (wait time) between ping cycles, time interval until the next ping sequence "
            "occurring (for checking the cellular network availability)"
        ),
    ),
    Entry(
        name="com_no_network_timeout",
        group="AMM (EC)",
        term="Timeout at GPRS login fail",
        default="30",
        unit="s",
        seed_unit="minutes",
        kind="minutes",
        support="accepted",
        minimum=0,
        maximum=1440,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description=(
            "Timeout when GPRS (PDP) login fails - tolerance interval of PDP connection establishment error"
        ),
    ),
    Entry(
        name="snrp_bis_timeout",
        group="AMM (EC)",
        term="Wait-time until module-reset (hours)",
        default="24",
        unit="s",
        seed_unit="hours",
        kind="hours",
        support="applied",
        minimum=0,
        maximum=8760,
        note=(
            "Hours the connectivity watchdog (com_ping_host) may find the uplink unreachable before "
            "dcud restarts itself (exit 75, as the daily restart): the DCU's module reset. 0 = never; "
            "no effect without com_ping_host. The cellular modem's own reset is ModemManager's on "
            "Linux. Hours become seconds."
        ),
        description="Module restart after this interval",
    ),
    Entry(
        name="snrp_restart_time",
        group="AMM (EC)",
        term="Modem daily restart at [HH:MM]",
        default=None,
        unit="",
        seed_unit="HH:MM",
        kind="hhmm",
        support="applied",
        note="Daily restart of dcud at this local time; unset = no daily restart.",
        description=(
            "Daily restart on a fix, parametrised time, value in HH:MM format. If you attempt to "
            "define a daily restart interval for the device - add the HH:MM value of the time of the "
            "device restart. Leave it empty if you do not allow the device to restart every day."
        ),
    ),
    Entry(
        name="com_reconnect_interval",
        group="AMM (EC)",
        term="GPRS connection will be closed and restored after this time",
        default="0",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="accepted",
        minimum=0,
        maximum=86400,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description=(
            "Waiting interval between PDP connection establishment, the value is also used for ping. "
            "If the ping is configured (Ping wait-time [for reply] parameter), then the defined "
            "interval / repeat time will be used for automatic reconnection after the given delay has "
            "elapsed. Here you can define that after the network drops out the modem, how long does "
            "the modem wait before trying to reconnect to the mobile network again. Ask your mobile "
            "provider about the offered settings. Note that if you set this parameter to a low value "
            "that can cause frequent network reconections. Therefore under no circumstances should "
            "you set this value lower than what your mobile service provider recommends. (e.g. there "
            "are mobile network providers that time the number of times a modem can log on to the "
            "network in a given time)."
        ),
    ),
    Entry(
        name="snrp_restart_time_shift",
        group="AMM (EC)",
        term="Daily restart time frame window",
        default=None,
        unit="s",
        seed_unit="minutes",
        kind="minutes",
        support="applied",
        minimum=0,
        maximum=1440,
        note=("Seed default '-' while its text says 'Default value: 0': unset means no window (0)."),
        description="Default value: 0",
    ),
    Entry(
        name="com_dis_connect",
        group="AMM (EC)",
        term="Disable Service Session (DTTA)",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="Enable/disable DTTA services",
    ),
    Entry(
        name="com_dis_apn_name",
        group="AMM (EC)",
        term="APN name for device services session",
        default=None,
        unit="",
        seed_unit="name (text, APN allowed chars)",
        kind="apn",
        support="accepted",
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="Tells module FOTA support",
    ),
    Entry(
        name="com_dis_apn_user",
        group="AMM (EC)",
        term="APN user name for device services session",
        default=None,
        unit="",
        seed_unit="username (text, numbers)",
        kind="text",
        support="accepted",
        minimum=1,
        maximum=64,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description="APN user name - ask your mobile operator for the GSM",
    ),
    Entry(
        name="com_dis_apn_pass",
        group="AMM (EC)",
        term="APN password for device services session",
        default=None,
        unit="",
        seed_unit="password",
        kind="password",
        support="accepted",
        minimum=1,
        maximum=64,
        secret=True,
        note="The OS owns the cellular modem on Linux (ModemManager/NetworkManager).",
        description=(
            "APN Username - if you mobile operator / APN requires Tells module FOTA support APN "
            "Password - if you mobile operator / APN requires"
        ),
    ),
    Entry(
        name="com.dns_w46",
        group="WATCHDOG (FOTA)",
        term="Cellular network access technology selection (LTE, 3G, 2G mode) for FOTA",
        default="25",
        unit="",
        seed_unit="special syntax",
        kind="selection",
        support="accepted",
        allowed=("-1", "0", "1", "2", "12", "22", "25", "28", "29", "30", "31"),
        note=(
            "Seed value list is garbled ('not changed' and NB-IoT both 1, '3G only' twice); read as "
            "-1 = not changed, 0 = Cat-M1, 1 = NB-IoT, 2 = Cat-M1 and NB-IoT, 12 = 2G only, 22 = 3G "
            "only, 25 = all, 28 = LTE only, 29 = 3G with 2G fallback, 30 = LTE with 2G fallback, 31 = "
            "LTE with 3G fallback. The OS owns the cellular modem on Linux "
            "(ModemManager/NetworkManager)."
        ),
        description=(
            "Here you can select a dedicated network for FOTA firmware updates or in case of "
            "availability of fallback channel you can choose that, or there is the opportunity to "
            'choose "All available access technology" values. * Current setting is not changed" - '
            'Value: 1 * "CAT M2" - Value: 0 * "NB-IoT" - Value: 1 * "Cat-M1 and NB-IoT" - Value: 2 * '
            '"3G only" - Value: 12 * "3G only" - Value: 22 * "All available access technology '
            '(Default)" - Value: 25 * "LTE only" - Value: 28 "Fallback on LTE Cat.1 modems * "3G with '
            'Fallback to 2G" - Value: 29 * "LTE with Fallback to 2G" - Value: 30 * "LTE with Fallback '
            'to 3G" - Value: 31 Note that the listed modes are not available for all modem type. The '
            "marked modes are only available if the cellular network access technology mode is "
            'supported by the current module. For LTE 4G modems we offer to choose the "LTE with '
            'Fallback to 2G" value 30 - if the fallback channel is supported on the modem or the LTE '
            'to 3G fallback (Value: 31) if it is supported. If the "all available network" option is '
            "supported by the modem and it was chosen, the modem will try to register to the last "
            "successful technology."
        ),
    ),
    Entry(
        name="com.dns_fpoata_retry",
        group="WATCHDOG (FOTA)",
        term="Retry count of FOTA process",
        default="0",
        unit="",
        seed_unit="number",
        kind="number",
        support="accepted",
        minimum=0,
        maximum=255,
        note="FOTA of the cellular module, which dcud does not own.",
        description="Module FOTA support FTP firmware refresh retry numbers",
    ),
    Entry(
        name="com.dns_fpoata_par",
        group="WATCHDOG (FOTA)",
        term="Server address, filename and path",
        default=None,
        unit="",
        seed_unit="ftp path/URL with credentials",
        kind="url",
        support="accepted",
        allowed=("ftp", "ftps"),
        secret=True,
        note=("FOTA of the cellular module, which dcud does not own. Only the password part is secret."),
        description=(
            "Module FOTA support FTP server address and connection parameters - as protocol, IP "
            "address as user and password. Leave it empty if it is not used"
        ),
    ),
    Entry(
        name="com.dns_fpoata_status",
        group="WATCHDOG (FOTA)",
        term="Status of the update process",
        default=None,
        unit="",
        seed_unit="READ ONLY",
        kind="text",
        support="read-only",
        note="Status value.",
        description="Module FOTA support Status information of the current FTP OTA status",
    ),
    Entry(
        name="emp_reboot",
        group="WATCHDOG (FOTA)",
        term="Reboot the device",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note=(
            "Read as the seed's 'enable or disable device reboot': 1 lets the MQTT command cmd/reboot "
            "reboot the DCU (method: dcud.toml [remote] reboot; docs/remote-config.md), 0 refuses it. "
            "Setting it never reboots by itself."
        ),
        description="Enable or disable device reboot",
    ),
    Entry(
        name="com.at_wmbms",
        group="MOBILE NETWORK",
        term="Band frequency configuration",
        default="-1",
        unit="",
        seed_unit="list code",
        kind="list-code",
        support="accepted",
        note=(
            "Seed entry type 'list code' without syntax: dcud accepts -1 (not changed) or "
            "comma-separated band codes, decimal or 0x-hex. The OS owns the cellular modem on Linux "
            "(ModemManager/NetworkManager)."
        ),
        description=(
            "WMBS tab: 2G, 3G, LTE... access cellular network technology selection. Here you can "
            "select a dedicated network for FOTA firmware updates or in case of availability of "
            'fallback channel you can choose that, or there is the opportunity to choose "All '
            'available access technology" values. * Current setting is not changed" - Value: 1 * "CAT '
            'M2" - Value: 0 * "NB-IoT" - Value: 1 * "Cat-M1 and NB-IoT" - Value: 2 * "3G only" - '
            'Value: 12 * "3G only" - Value: 22 * "All available access technology (Default)" - Value: '
            '25 * "LTE only" - Value: 28 "Fallback on LTE Cat.1 modems * "3G with Fallback to 2G" - '
            'Value: 29 * "LTE with Fallback to 2G" - Value: 30 * "LTE with Fallback to 3G" - Value: '
            "31 Note that the listed modes are not available for all modem type. The marked modes are "
            "only available if the cellular network access technology mode is supported by the "
            'current module. For LTE 4G modems we offer to choose the "LTE with Fallback to 2G" value '
            "30 - if the fallback channel is supported on the modem or the LTE to 3G fallback (Value: "
            '31) if it is supported. If the "all available network" option is supported by the modem '
            "and it was chosen, the modem will try to register to the last successful technology."
        ),
    ),
    Entry(
        name="com.in_cid",
        group="MOBILE NETWORK",
        term="Type of call",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="accepted",
        minimum=0,
        maximum=255,
        note=(
            "The seed lists no values (CBST bearer types); dcud accepts a code 0..255. No CSD calls "
            "on this hardware."
        ),
        description="It is necessary for CBST and CSNS commands CIDB tab.",
    ),
    Entry(
        name="com.in_rings",
        group="MOBILE NETWORK",
        term="Number of rings before accept a call (CSID)",
        default="3",
        unit="",
        seed_unit="number",
        kind="number",
        support="accepted",
        minimum=0,
        maximum=255,
        note="No CSD calls on this hardware.",
        description=(
            "Values: 0-255 Wait for the defined number of rings before accepting the data call (CSID)"
        ),
    ),
    Entry(
        name="com.password",
        group="MOBILE NETWORK",
        term="Password for CHD call",
        default=None,
        unit="",
        seed_unit="password",
        kind="password",
        support="accepted",
        minimum=1,
        maximum=64,
        secret=True,
        note="No CSD calls or SMS on this hardware.",
        description="Login pass for call and SMS",
    ),
    Entry(
        name="com.sim_pin_code",
        group="MOBILE NETWORK",
        term="SIM PIN code",
        default=None,
        unit="",
        seed_unit="PIN code",
        kind="pin",
        support="accepted",
        secret=True,
        note=("4..8 digits. The OS owns the cellular modem on Linux (ModemManager/NetworkManager)."),
        description="PIN code of the SIM card - ask your mobile provider",
    ),
    Entry(
        name="com.sim_at_cops",
        group="MOBILE NETWORK",
        term="Provider selection mode (roaming)",
        default=None,
        unit="",
        seed_unit="SELECTION",
        kind="cops",
        support="accepted",
        note=(
            "AT+COPS syntax: mode (0..4)[,format (0..2)[,operator]]. The OS owns the cellular modem "
            "on Linux (ModemManager/NetworkManager)."
        ),
        description=("Cellular network provider change parameter. Syntax in file: module, format, operator"),
    ),
    Entry(
        name="com.emp",
        group="MOBILE NETWORK",
        term="Incoming voice calls receiving as data calls (CSID)",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="accepted",
        note="No CSD calls on this hardware.",
        description="Incoming voice calls will be received as data calls (CSID)",
    ),
    Entry(
        name="calendar_dst_begin",
        group="CALENDAR",
        term="Daylight saving time",
        default="FFFFF07D3000003C",
        unit="",
        seed_unit="Date/Time",
        kind="hexdate",
        support="applied",
        note=(
            "16 hex digits (8 octets); the seed gives no field layout, so dcud validates the form and "
            "keeps the octets (HexDate)."
        ),
        description="Start date of daylight saving (summer) in hexadecimal format",
    ),
    Entry(
        name="calendar_dst_end",
        group="CALENDAR",
        term="Standard time",
        default="FFFFF07D30000078",
        unit="",
        seed_unit="Date/Time",
        kind="hexdate",
        support="applied",
        note=(
            "16 hex digits (8 octets); the seed gives no field layout, so dcud validates the form and "
            "keeps the octets (HexDate)."
        ),
        description="End date of daylight saving (winter) in hexadecimal format",
    ),
    Entry(
        name="calendar_dst_enabled",
        group="CALENDAR",
        term="Switching daylight saving time / normal time",
        default="1",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note="",
        description=(
            "You can switch on or off the daylight saving time / normal time handle Values: 0 - No, 1 - On"
        ),
    ),
    Entry(
        name="calendar_dst_deviation",
        group="CALENDAR",
        term="Offset daylight saving time",
        default="60",
        unit="s",
        seed_unit="minutes",
        kind="minutes",
        support="applied",
        minimum=0,
        maximum=120,
        note="",
        description="GMT offset of daylight saving time handle (in minutes)",
    ),
    Entry(
        name="calendar_timezone",
        group="CALENDAR",
        term="Deviation of local time to GMT",
        default="60",
        unit="s",
        seed_unit="minutes",
        kind="minutes",
        support="applied",
        minimum=-720,
        maximum=840,
        note=(
            "Local time minus UTC in minutes (60 = UTC+1); the seed's description calls it the DST "
            "deviation, the term is what dcud follows."
        ),
        description="GMT deviation of daylight saving time handle (in minutes)",
    ),
    Entry(
        name="led1",
        group="CALENDAR",
        term="Meaning of LED 1",
        default="1",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        minimum=0,
        maximum=255,
        note=LED_NOTE,
        description="LED tab - selecting the nr. of LED meaning in the LED selection list",
    ),
    Entry(
        name="led2",
        group="CALENDAR",
        term="Meaning of LED 2",
        default="6",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        minimum=0,
        maximum=255,
        note=LED_NOTE,
        description="LED tab - selecting the nr. of LED meaning in the LED selection list",
    ),
    Entry(
        name="led3",
        group="CALENDAR",
        term="Meaning of LED 3",
        default="4",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        minimum=0,
        maximum=255,
        note=LED_NOTE,
        description="LED tab - selecting the nr. of LED meaning in the LED selection list",
    ),
    Entry(
        name="led4",
        group="CALENDAR",
        term="Meaning of LED 4",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        minimum=0,
        maximum=255,
        note=LED_NOTE,
        description="LED tab - selecting the nr. of LED meaning in the LED selection list",
    ),
    Entry(
        name="led5",
        group="CALENDAR",
        term="Meaning of LED 5",
        default="30",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        minimum=0,
        maximum=255,
        note=LED_NOTE,
        description="LED tab - selecting the nr. of LED meaning in the LED selection list",
    ),
    Entry(
        name="led6",
        group="CALENDAR",
        term="Meaning of LED 6",
        default="2",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        minimum=0,
        maximum=255,
        note=LED_NOTE,
        description="LED tab - selecting the nr. of LED meaning in the LED selection list",
    ),
    Entry(
        name="emeter_date_format",
        group="CALENDAR",
        term="Date format for read out",
        default="YYMMDD",
        unit="",
        seed_unit="Date",
        kind="date-format",
        support="accepted",
        note=(
            "Seed default 'YYMMDD (Read Ohv)' carries an extraction artefact; read as YYMMDD. dcud "
            "stamps readings in RFC 3339."
        ),
        description="Date format / syntax for readout (YYMMDD)",
    ),
    Entry(
        name="emeter_version",
        group="STANDARD METER INTERFACE",
        term="Version number of config file",
        default=None,
        unit="",
        seed_unit="Text",
        kind="text",
        support="accepted",
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, nothing more."
        ),
        description="*Not used",
    ),
    Entry(
        name="emset.am100.typekey",
        group="STANDARD METER INTERFACE",
        term="Type key of AM100 corresponding to the name plate",
        default=None,
        unit="",
        seed_unit="Text",
        kind="text",
        support="accepted",
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, nothing more."
        ),
        description="*Not used",
    ),
    Entry(
        name="emunit",
        group="STANDARD METER INTERFACE",
        term="Meter interface unit values",
        default=None,
        unit="",
        seed_unit="-",
        kind="text",
        support="accepted",
        note=(
            "Seed: *Not used (the WM-E firmware ignores it); dcud validates it and reports it, nothing more."
        ),
        description="* Not used",
    ),
    Entry(
        name="fw_3server_baud",
        group="STANDARD METER INTERFACE",
        term="Configuration Port Setting (Baudrate)",
        default=None,
        unit="baud",
        seed_unit="SELECTION",
        kind="selection",
        support="accepted",
        allowed=("9600", "14400", "19200", "28800", "38400", "57600", "115200"),
        note="Only on WM-E2S 7MB modems; no such port here.",
        description=(
            "Values (Baud): 9600, 14400, 19200, 28800, 38400, 57600, 115200 * Available only for "
            "WM-E2S 7MB modem"
        ),
    ),
    Entry(
        name="em_relay",
        group="STANDARD METER INTERFACE",
        term="Tariff Mode Selection",
        default=None,
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("0", "10", "20", "30", "40"),
        note=(
            "Drives the [relay] output of dcud.toml; where there is none it is reported as not present "
            "(relay state). The seed's labels are garbled (20 and 40 both '1T'); dcud reads the value as "
            "one tariff relay contact: 0 (None), 20 and 40 (1T) released, 10 (1R) and 30 (1T2) energised. "
            "Unset: the relay is not touched."
        ),
        description="Values: 0-None, 10-1R, 20-1T, 30-1T2, 40-1T * Only for WM-E2S 8 Relay version",
    ),
    Entry(
        name="emp.mz_mode",
        group="STANDARD METER INTERFACE",
        term="Multi utility mode (DLMS active)",
        default="1",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="accepted",
        allowed=("1", "2"),
        note=(
            "1 = transparent, 2 = multi utility. Seed: only transparent mode is implemented; dcud is "
            "always transparent."
        ),
        description=(
            "Activates the E-meter LED Values: 1- transparent mode, 2 - multi utility mode * "
            "Transparent mode implemented only"
        ),
    ),
    Entry(
        name="tm.tls_enable",
        group="STANDARD METER INTERFACE",
        term="Transparent mode TLS enable",
        default="1",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note=(
            "Default 1 per the seed: the transparent port serves TLS unless set to 0 (needs a "
            "certificate in bank tm.cert)."
        ),
        description="En. TLS disabled & TLS enabled",
    ),
    Entry(
        name="tm.modselect",
        group="STANDARD METER INTERFACE",
        term="Data format for meters",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="accepted",
        allowed=("0", "1", "2"),
        note=(
            "Seed text 'DMES: 1-Optional, 2-Mandatory' looks copied from a verify row; meaning "
            "unknown, dcud accepts 0..2 and ignores it."
        ),
        description="DMES: 1-Optional, 2-Mandatory",
    ),
    Entry(
        name="tm.cert",
        group="TRANSP / NTA",
        term="Transparent mode certificate bank select",
        default="0",
        unit="",
        seed_unit="Number",
        kind="number",
        support="applied",
        minimum=0,
        maximum=255,
        note=(
            "Certificate bank number under state_dir; 0 = none. The seed's value list is copied from "
            "em_relay (garbled)."
        ),
        description="Transparent certificate bank selection",
    ),
    Entry(
        name="tm.use_crl",
        group="TRANSP / NTA",
        term="Transparent mode CRL usage",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note="",
        description="1-Yes, 0-No",
    ),
    Entry(
        name="tm.ca_cert",
        group="TRANSP / NTA",
        term="Transparent CA certificate bank select",
        default="0",
        unit="",
        seed_unit="Number",
        kind="number",
        support="applied",
        minimum=0,
        maximum=255,
        note=(
            "Certificate bank number under state_dir; 0 = none. The seed's comment ('1-Yes, 0-No') is "
            "copied from a checkbox row; the seed's entry type is Number."
        ),
        description="1-Yes, 0-No",
    ),
    Entry(
        name="tm.baud",
        group="TRANSP / NTA",
        term="Meter port baud rate (for transparent mode and meter readout)",
        default="9600",
        unit="baud",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("300", "600", "1200", "2400", "4800", "9600", "19200", "38400", "57600", "115200"),
        note="Seed lists 56100, which is no baud rate; read as 57600.",
        description=("Values (in bps) can be: 300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 56100, 115200"),
    ),
    Entry(
        name="tm.verify",
        group="TRANSP / NTA",
        term="Transparent mode certificate verification",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("0", "1", "2"),
        note=(
            "0 = none, 1 = optional, 2 = mandatory (peer certificate verification). The seed's "
            "comment columns are shifted by one row here ('Recommended: 9600 (bps)' belongs to "
            "tm.baud; the values appear on tm2.port and dm.verify)."
        ),
        description="Transparent mode certificate verification",
    ),
    Entry(
        name="tm2.port",
        group="SECONDARY TRANSPARENT",
        term="Secondary transparent port",
        default="9002",
        unit="",
        seed_unit="Port number",
        kind="port",
        support="applied",
        minimum=1,
        maximum=65535,
        note=(
            "Must differ from tm_server_port and fw_server_port (checked). The seed's 'Values: "
            "1-Optional, 2-Mandatory' belongs to tm.verify."
        ),
        description="Secondary transparent socket port",
    ),
    Entry(
        name="tm2.baud",
        group="SECONDARY TRANSPARENT",
        term="Secondary transparent baudrate",
        default="2400",
        unit="baud",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("300", "600", "1200", "2400", "4800", "9600", "19200", "38400", "57600", "115200"),
        note=(
            "Seed default 2418 is no baud rate; read as 2400 (the M-Bus rate this port serves). Seed "
            "lists 56100; read as 57600."
        ),
        description=(
            "Values (in bps) can be SELECTED: 300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 56100, "
            "115200 on WM-E 8 Form. The value MUST NOT modified directly in the configuration file! "
            "*Only used by WM-E2S MBUS Modems"
        ),
    ),
    Entry(
        name="dcd.mode",
        group="RS485",
        term="DCD mode",
        default="3",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("0", "1", "2", "3"),
        note="0 = DirX 0, 1 = DirX 1, 2 = standard, 3 = inverted.",
        description="Available DCD modes: 0-DirX 0, 1-DirX 1, 2-Standard, 3-Inverted",
    ),
    Entry(
        name="rs485.mode",
        group="RS485",
        term="RS485 mode",
        default="0",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("0", "1", "2"),
        note="0 = RS232 only, 1 = 2-wire RS485, 2 = 4-wire RS485.",
        description="0-RS232 only, 1-2-wire RS485, 2-4-wire RS485",
    ),
    Entry(
        name="dm.tls_enable",
        group="RS485",
        term="Device Manager TLS enable",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note="",
        description="1-Yes, 0-No",
    ),
    Entry(
        name="dm.server",
        group="RS485",
        term="Device Manager server IP address",
        default=None,
        unit="",
        seed_unit="IP address",
        kind="host",
        support="applied",
        note="Seed: IP address; dcud also accepts a DNS name. Unset: no device manager push.",
        description="Remote Device Manager server IP",
    ),
    Entry(
        name="dm.port",
        group="RS485",
        term="Device Manager server port",
        default="0",
        unit="",
        seed_unit="Port number",
        kind="port",
        support="applied",
        minimum=0,
        maximum=65535,
        note="0 = no device manager push.",
        description="Device Manager server port number",
    ),
    Entry(
        name="dm.push_enable",
        group="RS485",
        term="Device Manager push enable",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note="The seed's comment for this row is copied from dm.use_crl.",
        description="1-Yes, 0-No",
    ),
    Entry(
        name="dm.push_interval",
        group="RS485",
        term="Device Manager push interval [sec]",
        default="120",
        unit="s",
        seed_unit="number",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=86400,
        note="Seed entry type is number; the term ('[sec]') and text make it seconds.",
        description='DIM data "push" cycle / interval value in seconds',
    ),
    Entry(
        name="dm.cert",
        group="RS485",
        term="Device Manager certificate bank",
        default="0",
        unit="",
        seed_unit="Number",
        kind="number",
        support="applied",
        minimum=0,
        maximum=255,
        note=(
            "Certificate bank number under state_dir; 0 = none. The seed's comment ('1-Yes, 0-No') is "
            "copied from a checkbox row; the seed's entry type is Number."
        ),
        description="1-Yes, 0-No",
    ),
    Entry(
        name="dm.use_crl",
        group="RS485",
        term="Device Manager CRL usage",
        default="0",
        unit="",
        seed_unit="Checkbox to enable/disable",
        kind="checkbox",
        support="applied",
        note="",
        description="1-Yes, 0-No",
    ),
    Entry(
        name="dm.verify",
        group="RS485",
        term="Device Manager certification verification",
        default="2",
        unit="",
        seed_unit="SELECTION",
        kind="selection",
        support="applied",
        allowed=("0", "1", "2"),
        note=(
            "0 = none, 1 = optional, 2 = mandatory (peer certificate verification). The seed's default"
            " is 0; dcud defaults to 2 so that the device manager's document never goes to a server"
            " that was not verified (with dm.tls_enable=0 nothing is pushed until dm.verify=0 is set"
            " on purpose)."
        ),
        description="0-None, 1-Optional, 2-Mandatory",
    ),
    Entry(
        name="dm.ca_cert",
        group="RS485",
        term="Device Manager CA certificate bank",
        default="0",
        unit="",
        seed_unit="Number",
        kind="number",
        support="applied",
        minimum=0,
        maximum=255,
        note=(
            "Certificate bank number under state_dir; 0 = none. The seed's comment ('1-Yes, 0-No') is "
            "copied from a checkbox row; the seed's entry type is Number."
        ),
        description="1-Yes, 0-No",
    ),
    Entry(
        name="ntp.address",
        group="NETWORK PROTOCOLS",
        term="NTP Server IP Address",
        default=None,
        unit="",
        seed_unit="IP address",
        kind="host",
        support="applied",
        note=(
            "Seed: IP address; dcud also accepts a DNS name. Two spellings are two parameters: ntp.* "
            "(v5 NETWORK PROTOCOLS group) and the legacy ntp_*. When both are set in the file, the "
            "dotted one is used."
        ),
        description="Server address of NTP time synchronization",
    ),
    Entry(
        name="ntp.port",
        group="NETWORK PROTOCOLS",
        term="NTP server port",
        default="0",
        unit="",
        seed_unit="Port number",
        kind="port",
        support="applied",
        minimum=0,
        maximum=65535,
        note=(
            "0 = 123. Two spellings are two parameters: ntp.* (v5 NETWORK PROTOCOLS group) and the "
            "legacy ntp_*. When both are set in the file, the dotted one is used."
        ),
        description="Server port nr. of NTP time synchronization",
    ),
    Entry(
        name="ntp.interval",
        group="NETWORK PROTOCOLS",
        term="NTP server synchronization interval [sec]",
        default="30",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=86400,
        note=(
            "Two spellings are two parameters: ntp.* (v5 NETWORK PROTOCOLS group) and the legacy "
            "ntp_*. When both are set in the file, the dotted one is used."
        ),
        description="Cycle of NTP time synchronization",
    ),
    Entry(
        name="ntp.timeout",
        group="NETWORK PROTOCOLS",
        term="NTP server synchronization timeout [sec]",
        default="10",
        unit="s",
        seed_unit="seconds",
        kind="seconds",
        support="applied",
        minimum=1,
        maximum=600,
        note=(
            "The seed's description column repeats ntp.interval's; the comment column is used. Two "
            "spellings are two parameters: ntp.* (v5 NETWORK PROTOCOLS group) and the legacy ntp_*. "
            "When both are set in the file, the dotted one is used."
        ),
        description=("Timeout for NTP sync attempt - after this period the NTP sync attempt will be stopped"),
    ),
)
