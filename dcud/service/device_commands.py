"""``<p>/cmd/restart`` and ``<p>/cmd/reboot``: restart dcud or reboot the DCU from the head-end.

Both are state-changing commands under the rules of ``param/set`` (docs/remote-config.md, "MQTT
commands"): whenever an envelope key (``fw_server_key``) is configured they need an envelope (the
router refuses a plain request); without a key a plain request is accepted only with ``[remote]
plain_param_set = true`` in dcud.toml. The reply goes out first: the restart or reboot starts only
once the broker has acknowledged it (:meth:`dcud.service.commands.CommandRouter.serve`), so the
head-end always learns that its command was taken.

- ``restart``: a graceful stop with exit code 75, exactly as the daily restart (``snrp_restart_time``);
  systemd starts dcud again (``RestartForceExitStatus=75``).
- ``reboot``: needs ``emp_reboot=1`` (the WM-E "enable or disable device reboot" checkbox; default 0)
  and a reboot method in dcud.toml (``[remote] reboot``):

  - ``logind`` (default): systemd-logind's D-Bus API through ``busctl``, systemd's own client, run as a
    subprocess with a timeout. Before replying, ``CanReboot`` asks logind (and through it polkit)
    whether dcud may reboot: anything but ``yes`` refuses the command with logind's answer. After
    the reply, ``Reboot(false)`` (never interactive: no agent could answer a password prompt).
    Chosen over a Python D-Bus library: no new dependency (jeepney, dbus-next, dbus-fast, sdbus were
    the candidates), and busctl is present wherever logind is, at logind's version.
  - ``command``: ``reboot_command`` (absolute path and arguments, no shell), for boxes with a vendor
    helper, and the stand-in of the tests; it must exist and be executable to be accepted.
  - ``none``: refused.

  A reboot that fails after its reply (busctl or the command failed or timed out, logind refused at
  the last moment) is logged and raises an event ``reboot_failed``: the head-end learns it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Protocol

import msgspec
import structlog

from dcud.config.loader import LoadedConfig
from dcud.errors import DcudError
from dcud.runtime.events import EventSink
from dcud.service.commands import CommandContext, CommandError, CommandRouter, NotAuthorizedError, Request

log = structlog.get_logger("dcud.device_commands")

MAX_OUTPUT_BYTES = 4096
"""What is kept of a reboot program's output (for the error message and the log)."""
LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")
"""Bus name, object path and interface of systemd-logind's manager."""


class RestartRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``restart``: stop gracefully and exit 75 (systemd starts dcud again)."""

    who: Annotated[str, msgspec.Meta(max_length=64)] = "mqtt"


class RebootRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``reboot``: reboot the DCU through the method of ``[remote] reboot``."""

    who: Annotated[str, msgspec.Meta(max_length=64)] = "mqtt"


class RebootRefusedError(CommandError):
    """This DCU may not reboot now: method ``none``, ``emp_reboot=0``, or logind/polkit said no."""


class RebootFailedError(DcudError):
    """The reboot method failed after it was accepted (program error, timeout)."""


class RebootMethod(Protocol):
    """How the DCU reboots (``[remote] reboot``)."""

    @property
    def name(self) -> str:
        """The method's name as in dcud.toml."""
        ...

    async def check(self) -> str:
        """Whether a reboot is permitted now (a short detail); RebootRefusedError if not."""
        ...

    async def reboot(self) -> None:
        """Start the reboot; RebootFailedError if that failed."""
        ...


async def run_bounded(
    argv: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run ``argv`` (no shell, no stdin) within ``timeout_s``; ``(exit status, output)``.

    Output (stdout and stderr) is kept up to :data:`MAX_OUTPUT_BYTES`. A program that does not end
    in time is killed: RebootFailedError. A program that cannot start: OSError.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env) if env is not None else None,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            output = await proc.stdout.read(MAX_OUTPUT_BYTES)
            # Drain the rest without keeping it, so that a chatty program cannot block on a full pipe.
            while await proc.stdout.read(65536):
                pass
            status = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RebootFailedError(f"{argv[0]} did not finish within {timeout_s:g} s (killed)") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    return status, output.decode(errors="replace").strip()


class NoReboot:
    """``reboot = "none"``: every reboot is refused."""

    name = "none"

    async def check(self) -> str:
        """Always refused."""
        raise RebootRefusedError('reboot is off on this DCU ([remote] reboot = "none" in dcud.toml)')

    async def reboot(self) -> None:
        """Never reached (check refuses)."""
        raise RebootFailedError('reboot is off on this DCU ([remote] reboot = "none")')


_BUSCTL_STRING = re.compile(r'^s "([a-z-]*)"$')


class LogindReboot:
    """``reboot = "logind"``: ``CanReboot`` then ``Reboot(false)`` through ``busctl --system``.

    The system bus is the one sd-bus connects to: ``DBUS_SYSTEM_BUS_ADDRESS`` when set (the tests
    point it at a private bus), else ``/run/dbus/system_bus_socket``.
    """

    name = "logind"

    def __init__(
        self, timeout_s: float, busctl: str = "busctl", env: Mapping[str, str] | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self.busctl = busctl
        self.env = env

    def argv(self, method: str, *args: str) -> list[str]:
        """The busctl command line of one logind manager call."""
        # busctl's own timeout is shorter than ours, so that its message, not a kill, says what hung.
        timeout = max(1, int(self.timeout_s) - 1)
        return [self.busctl, "call", "--system", f"--timeout={timeout}", *LOGIND, method, *args]

    async def _call(self, method: str, *args: str) -> tuple[int, str]:
        try:
            return await run_bounded(self.argv(method, *args), self.timeout_s, self.env)
        except OSError as exc:
            raise RebootRefusedError(f"cannot run {self.busctl} (systemd's D-Bus client): {exc}") from None

    async def check(self) -> str:
        """Ask logind (and polkit) whether dcud may reboot: anything but ``yes`` is refused."""
        try:
            status, output = await self._call("CanReboot")
        except RebootFailedError as exc:
            raise RebootRefusedError(f"logind did not answer CanReboot: {exc}") from None
        if status != 0:
            raise RebootRefusedError(f"logind not reachable (busctl CanReboot: {output or status})")
        match = _BUSCTL_STRING.match(output)
        answer = match.group(1) if match else output[:100]
        if answer != "yes":
            hint = {
                "challenge": "polkit would ask for a password, which no one can give here: install the "
                "polkit rule of docs/systemd.md",
                "no": "polkit does not allow the dcud user to reboot (docs/systemd.md)",
                "na": "rebooting is not available on this system",
            }.get(answer, "unexpected answer")
            raise RebootRefusedError(f"logind CanReboot answered {answer!r}: {hint}")
        return "yes"

    async def reboot(self) -> None:
        """``Reboot(false)``: logind queues the reboot; systemd then stops dcud like every service."""
        try:
            status, output = await self._call("Reboot", "b", "false")
        except RebootRefusedError as exc:
            raise RebootFailedError(str(exc)) from None
        if status != 0:
            raise RebootFailedError(f"logind refused Reboot: {output or f'busctl exit status {status}'}")


class CommandReboot:
    """``reboot = "command"``: run ``reboot_command`` (no shell); exit status 0 is success."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout_s: float) -> None:
        self.argv = list(argv)
        self.timeout_s = timeout_s

    async def check(self) -> str:
        """The program must exist and be executable."""
        if not self.argv or not os.access(self.argv[0], os.X_OK):
            shown = self.argv[0] if self.argv else "(none)"
            raise RebootRefusedError(f"reboot_command {shown} is not an executable program")
        return "executable"

    async def reboot(self) -> None:
        """Run the program within the timeout."""
        try:
            status, output = await run_bounded(self.argv, self.timeout_s)
        except OSError as exc:
            raise RebootFailedError(f"cannot run {self.argv[0]}: {exc}") from None
        if status != 0:
            raise RebootFailedError(f"{self.argv[0]} exited with status {status}: {output[:500]}")


def reboot_method_for(config: LoadedConfig) -> RebootMethod:
    """The reboot method dcud.toml names (``[remote] reboot``)."""
    remote = config.toml.remote
    if remote.reboot == "logind":
        return LogindReboot(remote.reboot_timeout_s)
    if remote.reboot == "command":
        return CommandReboot(remote.reboot_command, remote.reboot_timeout_s)
    return NoReboot()


def _who(request_who: str) -> str:
    return request_who if request_who and request_who.isprintable() else "mqtt"


def _authorise(ctx: CommandContext, config: LoadedConfig) -> None:
    # With a key the router already refused a plain request; without one, plain needs the opt-in.
    if not ctx.authenticated and not config.toml.remote.plain_param_set:
        raise NotAuthorizedError(
            f"plain {ctx.verb} is off on this DCU: send it in an envelope (fw_server_key), or the "
            "installer sets [remote] plain_param_set = true in dcud.toml (it covers every state-changing "
            "command)",
            field="$.envelope",
        )


def register_device_commands(
    commands: CommandRouter,
    current: Callable[[], LoadedConfig],
    request_restart: Callable[[str], None],
    event: EventSink | None = None,
    *,
    reboot_method: Callable[[LoadedConfig], RebootMethod] = reboot_method_for,
) -> None:
    """Serve ``<p>/cmd/restart`` and ``<p>/cmd/reboot`` (module doc).

    ``current`` is the configuration in force (it changes on reload); ``request_restart`` stops
    dcud gracefully with exit 75 (``Runtime.request_restart``); ``event`` commits an event;
    ``reboot_method`` picks the method from the configuration (tests inject a stand-in).
    """

    async def restart(request: RestartRequest, ctx: CommandContext) -> Mapping[str, Any]:
        _authorise(ctx, current())
        who = _who(request.who)
        reason = f"restart requested by {who} via {ctx.source} cmd/restart"

        async def go() -> None:
            log.warning("restarting on request", who=who, authenticated=ctx.authenticated)
            request_restart(reason)

        ctx.after_reply.append(go)
        return {"restart": "after this reply", "exit_code": 75, "who": who}

    async def reboot(request: RebootRequest, ctx: CommandContext) -> Mapping[str, Any]:
        config = current()
        _authorise(ctx, config)
        if not config.params.get_bool("emp_reboot"):
            raise RebootRefusedError(
                "remote reboot is disabled on this DCU: emp_reboot=0 (set emp_reboot=1 to enable it)",
                field="$",
            )
        method = reboot_method(config)
        detail = await method.check()
        who = _who(request.who)

        async def go() -> None:
            log.warning("rebooting on request", who=who, method=method.name, authenticated=ctx.authenticated)
            try:
                await method.reboot()
            except RebootFailedError as exc:
                log.error("reboot failed", who=who, method=method.name, error=str(exc))
                if event is not None:
                    await event(
                        "reboot_failed", f"reboot requested by {who} failed: {exc}", method=method.name
                    )
                return
            log.warning("reboot started", method=method.name)

        ctx.after_reply.append(go)
        return {"reboot": "after this reply", "method": method.name, "check": detail, "who": who}

    commands.register("restart", RestartRequest, restart, state_changing=True)
    commands.register("reboot", RebootRequest, reboot, state_changing=True)
