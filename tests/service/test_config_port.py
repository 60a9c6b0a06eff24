"""The config port against a real daemon, with curl as the client (and a raw socket for slowloris).

Every test starts ``python -m dcud run`` on loopback with its own free port and checks what the issue
asks: good, bad, encrypted, tampered, replayed and plain-while-encrypted uploads, huge and slow
requests, firmware staging, masked reads, and kill -9 in the middle of applies.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dcud.config.loader import load_config, remote_parameters_path
from dcud.service.crypto_envelope import seal_stream
from dcud.service.remote_config import mask_parameter_text
from dcud.sim.peers import free_port

from helpers.config_port import (
    CURL,
    DEVICE,
    ENCRYPTED,
    KEY,
    KEYS,
    PLAIN_WRITES,
    curl,
    dcu,
    open_response,
    seal_request,
    start_ready,
    wait_count,
)
from helpers.daemon import daemon_log, stop_daemon, write_site
from helpers.notify import NotifySocket

pytestmark = pytest.mark.slow

# -- plain uploads ---------------------------------------------------------------------------------


def test_good_file_is_applied_and_reported(tmp_path: Path) -> None:
    with dcu(tmp_path) as d:
        upload = tmp_path / "new.conf"
        upload.write_text(
            f"# from the head-end\nntp_interval=300\nfw_server_port={d.port}\ndatapush_periodic=1\n"
        )
        code, body = curl("-T", str(upload), f"{d.url}/config")
        assert code == 200, body
        result = json.loads(body)
        assert result["changed"]["ntp_interval"] == {"old": "600", "new": "300"}
        assert "ntp" in result["restarted"] and "config_port" not in result["restarted"]
        assert d.remote_file().read_text() == upload.read_text()
        assert (
            d.remote_file().with_name("wme.conf.bak").read_text() == (d.site.parent / "wme.conf").read_text()
        )
        code, body = curl(f"{d.url}/config")
        assert code == 200 and body.decode() == upload.read_text()
        wait_count(d.notify, "RELOADING=1", 1, 20)
        wait_count(d.notify, "READY=1", 2, 20)


def test_put_names_the_parameters_that_have_no_effect(tmp_path: Path) -> None:
    # Issue 16: an accepted-only parameter (the OS owns the modem) is listed, not silently "OK".
    with dcu(tmp_path) as d:
        upload = f"ntp_interval=300\nfw_server_port={d.port}\ncom_apn_name=iot.example\ncom.in_rings=2\n"
        code, body = curl("-T", "-", f"{d.url}/config", data=upload.encode())
        assert code == 200, body
        assert json.loads(body)["no_effect"] == ["com.in_rings", "com_apn_name"]
        code, body = curl("-X", "PATCH", "--data-binary", "@-", f"{d.url}/config", data=b"ntp_interval=120\n")
        assert code == 200 and json.loads(body)["no_effect"] == [], body


def test_partial_file_changes_only_what_it_names(tmp_path: Path) -> None:
    with dcu(tmp_path, wme="datapush_periodic=1\n") as d:
        code, body = curl("-X", "PATCH", "--data-binary", "@-", f"{d.url}/config", data=b"ntp_interval=120\n")
        assert code == 200, body
        text = d.file_in_force()
        assert "ntp_interval=120" in text and "datapush_periodic=1" in text and "# installer's file" in text


def test_bad_file_is_refused_with_every_error_and_nothing_changes(tmp_path: Path) -> None:
    with dcu(tmp_path) as d:
        before = d.file_in_force()
        _, get_before = curl(f"{d.url}/config")
        bad = b"ntp_interval=ten\nno_such_param=1\nntp_interval=5\nfw_server_encrypt=1\n"
        code, body = curl("-X", "PUT", "--data-binary", "@-", f"{d.url}/config", data=bad)
        assert code == 422, body
        errors = json.loads(body)["errors"]
        keys = {(e["line"], e["key"]) for e in errors}
        assert {(1, "ntp_interval"), (2, "no_such_param"), (3, "ntp_interval")} <= keys
        assert any("fw_server_key" in e["message"] for e in errors)
        assert not d.remote_file().exists()
        assert d.file_in_force() == before
        assert curl(f"{d.url}/config")[1] == get_before
        code, _ = curl("-X", "PATCH", "--data-binary", "@-", f"{d.url}/config", data=b"\xff\xfe=1\n")
        assert code == 422


def test_reads_never_show_secrets(tmp_path: Path) -> None:
    with dcu(tmp_path, wme=f"fw_server_key={KEY}\ndatapush_host=ftp://u:pw-s3cret@10.0.0.9/in\n") as d:
        code, body = curl(f"{d.url}/config")
        assert code == 200
        assert KEY.encode() not in body and b"pw-s3cret" not in body and b"fw_server_key=***" in body
        code, body = curl(
            "-X", "PATCH", "--data-binary", "@-", f"{d.url}/config", data=b"fw_server_key=short\n"
        )
        assert code == 422 and b"short" not in body
        assert KEY not in daemon_log(d.site) and "pw-s3cret" not in daemon_log(d.site)


def test_unknown_routes_and_methods(tmp_path: Path) -> None:
    with dcu(tmp_path) as d:
        assert curl(f"{d.url}/nope")[0] == 404
        code, _ = curl("-X", "DELETE", f"{d.url}/config")
        assert code == 405
        out = subprocess.run(
            [str(CURL), "-sS", "-i", "-X", "DELETE", f"{d.url}/firmware"], capture_output=True, check=False
        )
        assert b"Allow: GET, PUT" in out.stdout


# -- encryption ----------------------------------------------------------------------------------------


def test_encrypted_upload_tampering_replay_and_plain_refusal(tmp_path: Path) -> None:
    with dcu(tmp_path, wme=ENCRYPTED) as d:
        envelope = seal_request(
            "PUT", "/config", f"{ENCRYPTED}ntp_interval=240\nfw_server_port={d.port}\n".encode()
        )
        code, body = curl("-X", "PUT", "--data-binary", "@-", f"{d.url}/config", data=envelope)
        assert code == 200, body
        result = json.loads(open_response(200, envelope, body))
        assert result["changed"]["ntp_interval"]["new"] == "240"
        after_good = d.file_in_force()

        # The same bytes again: a replay.
        code, body = curl("-X", "PUT", "--data-binary", "@-", f"{d.url}/config", data=envelope)
        assert code == 403 and b"replayed" in body, body

        # One bit changed anywhere: refused before decryption.
        fresh = seal_request("PUT", "/config", b"ntp_interval=60\n")
        for index in (10, 40, 60, len(fresh) - 1):
            tampered = bytearray(fresh)
            tampered[index] ^= 0x04
            code, body = curl("-X", "PUT", "--data-binary", "@-", f"{d.url}/config", data=bytes(tampered))
            assert code in (400, 403) and b"ntp_interval" not in body, body
        # An envelope made for another resource.
        other = seal_request("PUT", "/firmware", b"ntp_interval=60\n")
        code, _ = curl("-X", "PUT", "--data-binary", "@-", f"{d.url}/config", data=other)
        assert code == 403

        # Plain bodies and plain reads are refused while encryption is on.
        code, body = curl("-X", "PATCH", "--data-binary", "@-", f"{d.url}/config", data=b"ntp_interval=60\n")
        assert code == 403 and b"encryption required" in body
        assert curl(f"{d.url}/config")[0] == 403
        assert d.file_in_force() == after_good

        # An authenticated read answers with an envelope bound to the request.
        get = seal_request("GET", "/config", b"")
        code, body = curl("-X", "GET", "--data-binary", "@-", f"{d.url}/config", data=get)
        assert code == 200
        text = open_response(200, get, body).decode()
        assert "ntp_interval=240" in text and KEY not in text

        # A bad encrypted upload: 422, sealed, every error inside.
        bad = seal_request("PATCH", "/config", b"ntp_interval=ten\n")
        code, body = curl("-X", "PATCH", "--data-binary", "@-", f"{d.url}/config", data=bad)
        assert code == 422
        assert json.loads(open_response(422, bad, body))["errors"][0]["key"] == "ntp_interval"
        assert d.file_in_force() == after_good

        # Encrypted firmware, streamed and checked.
        firmware = bytes(random.Random(3).randrange(256) for _ in range(200_000))
        import hashlib

        sha = hashlib.sha256(firmware).hexdigest()
        upload = seal_stream(KEYS, firmware, b"PUT /firmware", device_id=DEVICE)
        code, body = curl(
            "-X",
            "PUT",
            "-H",
            f"X-Firmware-SHA256: {sha}",
            "--data-binary",
            "@-",
            f"{d.url}/firmware",
            data=upload,
        )
        assert code == 200, body
        assert json.loads(open_response(200, upload, body))["staged"]["sha256"] == sha
        staged = d.site.parent / "state" / "firmware" / f"{sha}.bin"
        assert staged.read_bytes() == firmware
        tampered = bytearray(seal_stream(KEYS, firmware, b"PUT /firmware", device_id=DEVICE))
        tampered[5000] ^= 1  # in the body: the authenticated header's SHA-256 no longer matches
        code, _ = curl(
            "-X",
            "PUT",
            "-H",
            f"X-Firmware-SHA256: {sha}",
            "--data-binary",
            "@-",
            f"{d.url}/firmware",
            data=bytes(tampered),
        )
        assert code == 403


def test_encrypted_body_while_encryption_is_off_is_refused(tmp_path: Path) -> None:
    with dcu(tmp_path) as d:
        envelope = seal_request("PUT", "/config", b"ntp_interval=60\n")
        code, body = curl("-X", "PUT", "--data-binary", "@-", f"{d.url}/config", data=envelope)
        assert code == 400 and b"fw_server_encrypt=0" in body


# -- hostile requests ----------------------------------------------------------------------------------


def test_huge_requests_are_refused_without_harm(tmp_path: Path) -> None:
    with dcu(tmp_path, config_port=PLAIN_WRITES + "max_body_bytes = 4096\nmax_firmware_bytes = 8192\n") as d:
        before = d.file_in_force()
        huge = tmp_path / "huge.conf"
        huge.write_bytes(b"ntp_interval=300\n" * 100_000)  # 1.7 MB
        code, body = curl("-T", str(huge), f"{d.url}/config")
        assert code == 413, body
        # Without a Content-Length (chunked): cut off once the limit is passed.
        code, body = curl(
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "@-",
            f"{d.url}/config",
            data=huge.read_bytes(),
        )
        assert code == 413, body
        code, body = curl("-T", str(huge), "-H", f"X-Firmware-SHA256: {'0' * 64}", f"{d.url}/firmware")
        assert code == 413, body
        # A request head larger than 16 KiB.
        code, _ = curl("-H", f"X-Big: {'a' * 20000}", f"{d.url}/config")
        assert code == 431
        assert d.file_in_force() == before
        assert curl(f"{d.url}/config")[0] == 200
        assert not list((d.site.parent / "state").glob("**/*.tmp"))


def test_slow_requests_are_cut_off_without_harm(tmp_path: Path) -> None:
    limits = "header_timeout_s = 1.0\nrequest_timeout_s = 2.0\nmax_connections = 2\n"
    limits += "max_connections_per_source = 4\n"  # the global limit is what this test is about
    with dcu(tmp_path, config_port=PLAIN_WRITES + limits) as d:
        before = d.file_in_force()
        body = b"# slow\n" * 600 + b"ntp_interval=300\n"
        # curl sending the body at 500 bytes/s: the whole request cannot arrive within 2 s.
        code, _ = curl(
            "--limit-rate", "500", "-X", "PUT", "--data-binary", "@-", f"{d.url}/config", data=body
        )
        assert code == 408
        # Slowloris: a request head that never ends.
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            sock.sendall(b"PUT /config HTTP/1.1\r\nHost: x\r\n")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
        # More idle connections than allowed: the extra one is refused at once (the port takes
        # connections in order, so once the idle two are accepted, every later one is refused).
        idle = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", d.port), timeout=10) as extra:
                assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        finally:
            for sock in idle:
                sock.close()
        assert d.file_in_force() == before
        deadline = time.monotonic() + 30
        while curl(f"{d.url}/config")[0] != 200:  # the slots free up as the server sees the closes
            assert time.monotonic() < deadline, "config port still busy"


def test_firmware_is_staged_with_its_hash_checked(tmp_path: Path) -> None:
    import hashlib

    with dcu(tmp_path) as d:
        firmware = tmp_path / "fw.img"
        firmware.write_bytes(bytes(range(256)) * 1000)
        sha = hashlib.sha256(firmware.read_bytes()).hexdigest()
        code, body = curl(
            "-T",
            str(firmware),
            "-H",
            f"X-Firmware-SHA256: {sha}",
            "-H",
            "X-Firmware-Name: fw-1.2.img",
            f"{d.url}/firmware",
        )
        assert code == 200, body
        assert json.loads(body)["staged"]["name"] == "fw-1.2.img"
        code, body = curl("-T", str(firmware), "-H", f"X-Firmware-SHA256: {'1' * 64}", f"{d.url}/firmware")
        assert code == 422 and b"mismatch" in body
        assert curl("-T", str(firmware), f"{d.url}/firmware")[0] == 422  # no hash declared
        code, body = curl(f"{d.url}/firmware")
        assert json.loads(body)["staged"]["sha256"] == sha  # the failed uploads changed nothing
        assert (d.site.parent / "state" / "firmware" / f"{sha}.bin").read_bytes() == firmware.read_bytes()


# -- power cut during applies ------------------------------------------------------------------------------


def test_kill_9_during_applies_leaves_old_or_new_file(tmp_path: Path) -> None:
    rng = random.Random(9)
    port = free_port()
    base = f"fw_server_port={port}\n"
    site = write_site(
        tmp_path / "site",
        wme=base + "ntp_interval=600\n",
        toml_extra=f'[config_port]\nlisten = "loopback"\n{PLAIN_WRITES}',
    )
    candidates = [base + "ntp_interval=600\n"]
    for i in range(6):
        # Big enough files that the write takes a while; each one distinct.
        candidates.append(
            base + "".join(f"# comment {i}-{n}\n" for n in range(3000)) + f"ntp_interval={300 + i}\n"
        )
    notify = NotifySocket(tmp_path / "notify.sock")
    ready = 0
    try:
        for cycle in range(3):
            ready += 1
            proc = start_ready(site, notify, port, ready)
            stop = threading.Event()

            def hammer(stop: threading.Event = stop) -> None:
                for n in range(10_000):
                    if stop.is_set():
                        return
                    text = candidates[1 + (n % (len(candidates) - 1))]
                    curl(
                        "-X",
                        "PUT",
                        "--max-time",
                        "5",
                        "--data-binary",
                        "@-",
                        f"http://127.0.0.1:{port}/config",
                        data=text.encode(),
                    )

            thread = threading.Thread(target=hammer)
            thread.start()
            time.sleep(rng.uniform(0.3, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            thread.join(timeout=60)
            # After the "power cut": the file in force is one complete candidate, and dcud starts on it.
            in_force = Path(load_config(site).params.path).read_text()
            assert in_force in candidates, f"cycle {cycle}: a mixed file is in force"
            backup = remote_parameters_path(site.parent / "state").with_name("wme.conf.bak")
            if backup.exists():
                assert backup.read_text() in candidates
        ready += 1
        proc = start_ready(site, notify, port, ready)
        code, body = curl(f"http://127.0.0.1:{port}/config")
        assert code == 200 and body.decode() == mask_parameter_text(in_force)
        assert stop_daemon(proc) == 0
    finally:
        notify.close()
