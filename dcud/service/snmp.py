"""SNMP notifications (traps) to the network operations centre's manager, with pysnmp 7 (asyncio).

Which events send a trap is :data:`dcud.service.snmp_mib.TRAPS`; the trap OIDs and varbinds are
``mibs/DCUD-MIB.txt``. The service registers a listener on the runtime's event hook: every event is
committed to the outbox first, then the listener turns it into a trap **synchronously** (the datagram is
handed to the kernel before the event producer continues), which is what the last-gasp sequence needs.

Configuration (WM-E parameters, see ``dcud params``):

- ``snmp_trap=1`` and ``snmp_manager_ip`` enable it; ``snmp_manager_port`` 0 means 162.
- ``snmp_version=2``: SNMPv2c; the **community is ``snmp_user``** (the WM-E has no separate community
  parameter). There is no default community: with ``snmp_user`` unset dcud sends **no trap at all**
  (neither v2c with ``public`` nor v3 without a user name) and says so in one warning per
  configuration load. ``snmp_user`` is a secret parameter: masked wherever parameters are shown.
- ``snmp_version=3``: USM user ``snmp_user``; ``snmp_auth_algo`` 0 = none, 1 = HMAC-MD5-96,
  2 = HMAC-SHA-96 with ``snmp_auth_key``; ``snmp_priv_algo`` 0 = none, 1 = CBC-DES, 2 = 3DES-EDE
  (draft-reeder, not supported by Net-SNMP), **3 = AES-128-CFB (RFC 3826), recommended** with
  ``snmp_priv_key``. Keys are pass phrases (>= 8 characters), localized to dcud's engine ID.
- dcud.toml ``[snmp] engine_id`` (hex) fixes the engine ID; unset, it is derived from ``device_id``
  (stable, :func:`dcud.service.snmp_mib.default_engine_id`). The receiver needs it for v3 traps
  (Net-SNMP: ``createUser -e <engine id> <user> SHA <key> AES <key>``); ``dcud params -c`` and
  ``<p>/status`` show it. ``snmpEngineBoots`` is persisted in ``state_dir/snmp-engine-boots`` and
  incremented at every start, so a receiver's timeliness check (RFC 3414, 150 s window) accepts the
  traps of a restarted dcud.

Traps are unacknowledged UDP: a lost trap is not retried (the event itself is durable in the outbox
and goes out on MQTT). Sent and failed traps are counted in the ``snmp`` state.

**INFORMs** (dcud.toml ``[snmp] inform = true``): every alarm except the last gasp
(:data:`dcud.service.snmp_mib.LAST_GASP_EVENTS`) is sent as an InformRequest, which the manager
acknowledges. Unacknowledged, it is sent again after ``inform_timeout_s``, at most ``inform_retries``
times (pysnmp's notification originator does the retries; for SNMPv3 it first discovers the
manager's engine ID, which the manager is authoritative for). An INFORM still unacknowledged after
its retries is counted (``informs_failed``) and logged once. At most :data:`MAX_INFORMS_PENDING`
INFORMs wait for an acknowledgement at once; an alarm beyond that goes out as a trap (counted,
``inform_overflow``), so a dead manager cannot make dcud hold an unbounded number of them. The
power-loss trap stays a trap: its path must stay synchronous and fast.

**One engine clock per process.** The trap sender and the read-only agent
(:mod:`dcud.service.snmp_agent`) are two pysnmp engines with the same engine ID; both take
``snmpEngineBoots`` and the start of ``snmpEngineTime`` from :func:`engine_clock`, read (and the
boots incremented) once per process, so a manager sees one consistent authoritative engine however
often a reload restarts either service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from dcud.config.loader import LoadedConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.durable import write_durably
from dcud.runtime.supervisor import ServiceContext
from dcud.service import snmp_mib
from dcud.transport.udp import loopback_sink

log = structlog.get_logger("dcud.snmp")

EventListener = Callable[[Mapping[str, Any]], None]
"""Called with every committed event payload (``type``, ``ts``, ``text``, ``uid``, extra fields)."""

DEFAULT_TRAP_PORT: Final = 162
BOOTS_FILE: Final = "snmp-engine-boots"
_MAX_BOOTS: Final = 2147483647  # RFC 3414: at the maximum the engine must be reconfigured

AUTH_ALGOS: Final[dict[int, str]] = {0: "none", 1: "MD5", 2: "SHA"}
"""``snmp_auth_algo`` value -> authentication protocol name."""
PRIV_ALGOS: Final[dict[int, str]] = {0: "none", 1: "DES", 2: "3DES", 3: "AES"}
"""``snmp_priv_algo`` value -> privacy protocol name (3 = AES-128 is dcud's addition)."""
MAX_INFORMS_PENDING: Final = 64
"""INFORMs awaiting an acknowledgement at once; further alarms go out as traps (counted)."""


@dataclass(frozen=True)
class SnmpServiceConfig:
    """The SNMP service's slice of the configuration."""

    device_id: str
    manager_ip: str
    manager_port: int
    version: int
    community: str = field(repr=False)
    user: str = field(repr=False)
    auth: str
    auth_key: str = field(repr=False)
    priv: str
    priv_key: str = field(repr=False)
    engine_id: bytes
    enterprise_oid: str
    state_dir: Path
    inform: bool = False
    inform_retries: int = 3
    inform_timeout_s: float = 5.0

    @property
    def security_level(self) -> str:
        """USM security level: noAuthNoPriv, authNoPriv or authPriv (v2c: noAuthNoPriv)."""
        if self.version != 3 or self.auth == "none":
            return "noAuthNoPriv"
        return "authNoPriv" if self.priv == "none" else "authPriv"

    @classmethod
    def from_config(cls, config: LoadedConfig) -> SnmpServiceConfig | None:
        """The slice, or None when traps are off.

        Off: ``snmp_trap`` unset/0, no manager address, or no ``snmp_user`` (the v3 user name and the
        v2c community: there is no default community, so nothing is sent; logged once per load).
        """
        params = config.params
        manager = params.get_opt_str("snmp_manager_ip")
        if not params.get_bool("snmp_trap") or not manager:
            return None
        section = config.toml.snmp
        user = params.get_opt_str("snmp_user") or ""
        version = params.get_int("snmp_version")
        if not user:
            log.warning(
                "SNMP traps are off: snmp_user is not set (the SNMPv3 user, and the SNMPv2c community; "
                "dcud has no default community and never sends 'public')",
                snmp_version=version,
                manager=manager,
            )
            return None
        return cls(
            device_id=config.device_id,
            manager_ip=manager,
            manager_port=params.get_int("snmp_manager_port") or DEFAULT_TRAP_PORT,
            version=version,
            community=user,
            user=user,
            auth=AUTH_ALGOS.get(params.get_int("snmp_auth_algo"), "none"),
            auth_key=params.get_opt_str("snmp_auth_key") or "",
            priv=PRIV_ALGOS.get(params.get_int("snmp_priv_algo"), "none"),
            priv_key=params.get_opt_str("snmp_priv_key") or "",
            engine_id=snmp_mib.engine_id_for(section.engine_id, config.device_id, section.enterprise_oid),
            enterprise_oid=section.enterprise_oid,
            state_dir=config.state_dir,
            inform=section.inform,
            inform_retries=section.inform_retries,
            inform_timeout_s=section.inform_timeout_s,
        )


def usm_protocols(auth: str, priv: str) -> tuple[Any, Any]:
    """pysnmp's USM authentication and privacy protocols for an :data:`AUTH_ALGOS` and a
    :data:`PRIV_ALGOS` name (the trap sender's and the agent's v3 user)."""
    from pysnmp.entity import config as snmp_config

    auth_protocols = {
        "none": snmp_config.USM_AUTH_NONE,
        "MD5": snmp_config.USM_AUTH_HMAC96_MD5,
        "SHA": snmp_config.USM_AUTH_HMAC96_SHA,
    }
    priv_protocols = {
        "none": snmp_config.USM_PRIV_NONE,
        "DES": snmp_config.USM_PRIV_CBC56_DES,
        "3DES": snmp_config.USM_PRIV_CBC168_3DES,
        "AES": snmp_config.USM_PRIV_CFB128_AES,
    }
    return auth_protocols[auth], priv_protocols[priv]


def next_engine_boots(state_dir: Path) -> int:
    """Read, increment and durably store ``snmpEngineBoots`` (1 on the first start)."""
    path = state_dir / BOOTS_FILE
    try:
        boots = int(path.read_text().strip()) + 1
    except (OSError, ValueError):
        boots = 1
    boots = min(max(boots, 1), _MAX_BOOTS)
    write_durably(path, f"{boots}\n".encode())
    return boots


@dataclass(frozen=True)
class EngineClock:
    """``snmpEngineBoots`` and the wall-clock second ``snmpEngineTime`` counts from (RFC 3414)."""

    boots: int
    started_unix_s: int

    def apply(self, engine: Any) -> None:
        """Make a pysnmp engine report this boots count and time base.

        pysnmp keeps ``snmpEngineTime`` as the second its engine was created and reports the time
        since then; setting that second makes every engine of the process count from the same start.
        """
        builder = engine.get_mib_builder()
        boots, engine_time = builder.import_symbols(
            "__SNMP-FRAMEWORK-MIB", "snmpEngineBoots", "snmpEngineTime"
        )
        boots.syntax = boots.syntax.clone(self.boots)
        engine_time.syntax = engine_time.syntax.clone(self.started_unix_s)


_ENGINE_CLOCKS: dict[Path, EngineClock] = {}
"""Per state directory (one per process in the daemon; tests use several): the process's clock."""


def engine_clock(state_dir: Path) -> EngineClock:
    """The engine clock of this process: boots incremented (durably) on the first call only."""
    key = state_dir.resolve()
    clock = _ENGINE_CLOCKS.get(key)
    if clock is None:
        clock = EngineClock(next_engine_boots(state_dir), int(time.time()))
        _ENGINE_CLOCKS[key] = clock
    return clock


class TrapSender:
    """One pysnmp engine configured for one manager; :meth:`send` encodes and sends synchronously.

    Create it inside a running event loop (pysnmp's asyncio transport binds to it); :meth:`close` it.
    """

    def __init__(
        self,
        config: SnmpServiceConfig,
        engine_boots: int | None = None,
        engine_started_unix_s: int | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        from pysnmp.carrier.asyncio.dgram import udp, udp6
        from pysnmp.entity import config as snmp_config
        from pysnmp.entity import engine
        from pysnmp.entity.rfc3413 import ntforg
        from pysnmp.proto import rfc1902

        self.config = config
        self._rfc1902 = rfc1902
        self._on_change = on_change
        self.engine: Any = engine.SnmpEngine(snmpEngineID=rfc1902.OctetString(config.engine_id))
        if engine_boots is not None:
            started = int(time.time()) if engine_started_unix_s is None else engine_started_unix_s
            EngineClock(engine_boots, started).apply(self.engine)
        self.engine_boots = engine_boots
        ipv6 = ":" in config.manager_ip
        module: Any = udp6 if ipv6 else udp
        self._transport: Any = module.UdpTransport().open_client_mode()
        snmp_config.add_transport(self.engine, module.DOMAIN_NAME, self._transport)
        if config.version == 3:
            auth_proto, priv_proto = usm_protocols(config.auth, config.priv)
            level = config.security_level
            snmp_config.add_v3_user(
                self.engine,
                config.user,
                auth_proto if level != "noAuthNoPriv" else snmp_config.USM_AUTH_NONE,
                config.auth_key if level != "noAuthNoPriv" else None,
                priv_proto if level == "authPriv" else snmp_config.USM_PRIV_NONE,
                config.priv_key if level == "authPriv" else None,
            )
            snmp_config.add_target_parameters(self.engine, "dcud-params", config.user, level, 3)
            security_model, security_name = 3, config.user
        else:
            level = "noAuthNoPriv"
            # An INFORM's Response comes back from the manager's address, which pysnmp accepts only
            # when the community's transport tag names a target at that address (RFC 3584 5.2.1).
            tag = "dcud-inform-managers" if config.inform else None
            snmp_config.add_v1_system(self.engine, "dcud-community", config.community, transportTag=tag)
            snmp_config.add_target_parameters(self.engine, "dcud-params", "dcud-community", level, 1)
            security_model, security_name = 2, "dcud-community"
        snmp_config.add_target_address(
            self.engine,
            "dcud-manager",
            module.DOMAIN_NAME,
            (config.manager_ip, config.manager_port),
            "dcud-params",
            tagList="dcud-managers",
        )
        snmp_config.add_notification_target(
            self.engine, "dcud-notification", "dcud-filter", "dcud-managers", "trap"
        )
        self._inform_target: str | None = None
        if config.inform:
            # The same manager once more, under its own tag, with the acknowledgement timeout (in
            # hundredths of a second, SNMP-TARGET-MIB) and the retry bound.
            snmp_config.add_target_address(
                self.engine,
                "dcud-inform-manager",
                module.DOMAIN_NAME,
                (config.manager_ip, config.manager_port),
                "dcud-params",
                timeout=max(1, round(config.inform_timeout_s * 100)),
                retryCount=config.inform_retries,
                tagList="dcud-inform-managers",
            )
            snmp_config.add_notification_target(
                self.engine, "dcud-inform", "dcud-filter-i", "dcud-inform-managers", "inform"
            )
            self._inform_target = "dcud-inform"
        snmp_config.add_context(self.engine, "")
        snmp_config.add_vacm_user(self.engine, security_model, security_name, level, (), (), (1, 3, 6))
        self._originator: Any = ntforg.NotificationOriginator()
        self._domain = module.DOMAIN_NAME
        self._notification = "dcud-notification"
        self.sent = 0
        self.failed = 0
        self.last_error = ""
        self.informs_sent = 0
        self.informs_acked = 0
        self.informs_failed = 0
        self.informs_pending = 0
        self.inform_overflow = 0

    async def wait_open(self) -> None:
        """Wait until the UDP socket exists (sends before that are queued by pysnmp, not lost)."""
        pending = getattr(self._transport, "_lport", None)
        if pending is not None:
            with contextlib.suppress(Exception):
                await pending

    async def warm_up(self) -> None:
        """Send one trap to a throw-away loopback socket of our own.

        pysnmp imports its cipher backends and resolves MIB symbols lazily on the first send (about
        20 ms here, far more on a small ARM CPU); paying that at start keeps the last-gasp trap fast.
        """
        from pysnmp.entity import config as snmp_config

        with loopback_sink(ipv6=":" in self.config.manager_ip) as (loopback, port):
            snmp_config.add_target_address(
                self.engine,
                "dcud-warmup",
                self._domain,
                (loopback, port),
                "dcud-params",
                tagList="dcud-warmup",
            )
            snmp_config.add_notification_target(
                self.engine, "dcud-warmup", "dcud-filter-w", "dcud-warmup", "trap"
            )
            self._notification = "dcud-warmup"
            counts = (self.sent, self.failed, self.last_error)
            try:
                self.send("power_loss", {"type": "power_loss", "text": "warm-up"})
            finally:
                # Restored before yielding, so a real alarm meanwhile goes to the manager. The
                # warm-up trap is not an alarm: the counters stay as they were.
                self._notification = "dcud-notification"
                self.sent, self.failed, self.last_error = counts
            try:
                await asyncio.sleep(0)
            finally:
                snmp_config.delete_notification_target(self.engine, "dcud-warmup", "dcud-params")
                snmp_config.delete_target_address(self.engine, "dcud-warmup")

    def send(self, event_type: str, event: Mapping[str, Any]) -> bool:
        """Send the notification of ``event_type`` now; False when that type has none or sending failed.

        A trap (or, with ``inform``, an INFORM for every type but the last gasp) is handed to the
        kernel before this returns; an INFORM's acknowledgement and retries happen later.
        """
        oid = snmp_mib.trap_oid(self.config.enterprise_oid, event_type)
        if oid is None:
            return False
        rfc = self._rfc1902
        varbinds: list[tuple[Any, Any]] = [
            (rfc.ObjectName(snmp_mib.SNMP_TRAP_OID_OID), rfc.ObjectIdentifier(oid)),
        ]
        for arc, text in snmp_mib.trap_values(self.config.device_id, dict(event)):
            varbinds.append(
                (rfc.ObjectName(snmp_mib.varbind_oid(self.config.enterprise_oid, arc)), rfc.OctetString(text))
            )
        inform = self._inform_target is not None and event_type not in snmp_mib.LAST_GASP_EVENTS
        if inform and self.informs_pending >= MAX_INFORMS_PENDING:
            inform = False
            self.inform_overflow += 1
        try:
            if inform:
                ident = (event_type, str(event.get("uid", "")))
                self._originator.send_varbinds(
                    self.engine, self._inform_target, None, b"", varbinds, self._on_inform_result, ident
                )
                self.informs_pending += 1
                self.informs_sent += 1
            else:
                self._originator.send_varbinds(
                    self.engine, self._notification, None, b"", varbinds, self._on_result, None
                )
        except Exception as exc:  # pysnmp raises a wide variety; a trap failure must not hurt the caller
            self.failed += 1
            self.last_error = repr(exc)
            return False
        self.sent += 1
        return True

    def _on_result(self, *args: Any) -> None:
        # (engine, handle, errorIndication, errorStatus, errorIndex, varBinds, ctx); for traps pysnmp
        # only calls back on a local error.
        error_indication = args[2] if len(args) > 2 else None
        if error_indication:
            self.failed += 1
            self.last_error = str(error_indication)

    def _on_inform_result(self, *args: Any) -> None:
        # (engine, handle, errorIndication, errorStatus, errorIndex, varBinds, ctx): called once per
        # INFORM, after the acknowledgement or after the last retry timed out.
        error_indication = args[2] if len(args) > 2 else None
        error_status = args[3] if len(args) > 3 else 0
        event_type, uid = args[6] if len(args) > 6 and isinstance(args[6], tuple) else ("", "")
        self.informs_pending = max(0, self.informs_pending - 1)
        if error_indication or error_status:
            self.informs_failed += 1
            self.last_error = str(error_indication or f"error-status {error_status}")
            log.warning(
                "INFORM not acknowledged after its retries",
                event_type=event_type,
                uid=uid,
                retries=self.config.inform_retries,
                error=self.last_error,
                informs_failed=self.informs_failed,
            )
        else:
            self.informs_acked += 1
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception as exc:  # a state publication must not break pysnmp's dispatcher
                log.error("snmp state not published", error=repr(exc))

    def close(self) -> None:
        """Close the UDP socket and the engine's dispatcher."""
        with contextlib.suppress(Exception):
            self.engine.close_dispatcher()


class SnmpTrapService:
    """Supervised service ``snmp``: turns committed events into traps."""

    name = "snmp"

    def __init__(
        self,
        config: SnmpServiceConfig,
        bus: EventBus,
        add_event_listener: Callable[[EventListener], Callable[[], None]],
    ) -> None:
        self.config = config
        self._bus = bus
        self._add_listener = add_event_listener
        self.sender: TrapSender | None = None

    def _publish_state(self) -> None:
        cfg = self.config
        sender = self.sender
        self._bus.set_state(
            "snmp",
            {
                "engine_id": snmp_mib.engine_id_hex(cfg.engine_id),
                "engine_boots": sender.engine_boots if sender else None,
                "version": "v3" if cfg.version == 3 else "v2c",
                "manager": f"{cfg.manager_ip}:{cfg.manager_port}",
                # snmp_user is a secret parameter (it is the v2c community): never in a state document.
                "user_set": bool(cfg.user),
                "security_level": cfg.security_level,
                "auth": cfg.auth if cfg.version == 3 else None,
                "priv": cfg.priv if cfg.version == 3 else None,
                "sent": sender.sent if sender else 0,
                "failed": sender.failed if sender else 0,
                "inform": cfg.inform,
                "informs_sent": sender.informs_sent if sender else 0,
                "informs_acked": sender.informs_acked if sender else 0,
                "informs_failed": sender.informs_failed if sender else 0,
                "informs_pending": sender.informs_pending if sender else 0,
                "inform_overflow": sender.inform_overflow if sender else 0,
            },
        )

    def _on_event(self, event: Mapping[str, Any]) -> None:
        sender = self.sender
        event_type = str(event.get("type", ""))
        if sender is None or event_type not in snmp_mib.TRAPS:
            return
        failed_before = sender.failed
        sender.send(event_type, event)
        if sender.failed != failed_before:
            log.warning("trap not sent", event_type=event_type, error=sender.last_error)
        self._publish_state()

    async def run(self, ctx: ServiceContext) -> None:
        """Open the engine, listen for events until stopped."""
        cfg = self.config
        if cfg.version == 3 and cfg.priv == "DES":
            ctx.log.warning("snmp_priv_algo=1 (DES) is broken cryptography; use 3 (AES-128)")
        clock = engine_clock(cfg.state_dir)
        boots = clock.boots
        self.sender = TrapSender(cfg, boots, clock.started_unix_s, on_change=self._publish_state)
        remove = self._add_listener(self._on_event)
        try:
            await self.sender.wait_open()
            await self.sender.warm_up()
            self._publish_state()
            ctx.log.info(
                "sending traps",
                manager=f"{cfg.manager_ip}:{cfg.manager_port}",
                version=cfg.version,
                security_level=cfg.security_level,
                engine_id=snmp_mib.engine_id_hex(cfg.engine_id),
                engine_boots=boots,
                inform=cfg.inform,
            )
            ctx.set_ready()
            await ctx.heartbeat_forever()
        finally:
            remove()
            self.sender.close()
