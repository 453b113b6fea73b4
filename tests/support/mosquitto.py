"""A private Mosquitto broker per test: its own config, port, password/ACL files, persistence and log.

The machine's system Mosquitto (127.0.0.1:1883) is never touched: every instance listens on a free port of
its own and keeps all state in its own directory. The broker is configured the way DESIGN §6 asks of the
production one (``max_queued_messages`` far above the default 1000, which drops QoS 1 messages silently;
payloads up to 4 MiB; persistence, so a restart keeps persistent sessions and their queued QoS 1 messages).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from blockdeepnet.ports import free_port, port_in_use
from blockdeepnet.wire import BROKER_MESSAGE_MAX_BYTES

HOST = "127.0.0.1"


def mosquitto_binary() -> str:
    """``$BDN_MOSQUITTO`` or ``mosquitto`` on PATH (Debian installs it in /usr/sbin, often not on PATH)."""
    for candidate in (os.environ.get("BDN_MOSQUITTO"), shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("mosquitto not found: install the mosquitto package or set $BDN_MOSQUITTO")


def _die_with_parent() -> None:
    """Linux: the broker gets SIGTERM when the thread that started it dies, so a crashed pytest leaves no
    orphan. (PR_SET_PDEATHSIG follows the starting *thread*: start brokers from the main thread.)"""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (``$7$`` PBKDF2-SHA512 hashes) made by ``mosquitto_passwd -b``, one call per
    user (``-c`` for the first creates the file). Passwords appear on that command line: tests only."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.unlink(missing_ok=True)
    for i, (user, password) in enumerate(users.items()):
        if ":" in user or not user:
            raise ValueError(f"mosquitto username {user!r} must be non-empty and free of ':'")
        args = [tool, *(["-c"] if i == 0 else []), "-b", str(path), user, password]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    if not users:
        path.write_text("")
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class MosquittoTls:
    """A TLS listener: the broker's certificate chain and key, and the CA that signs client certificates."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


class MosquittoProcess:
    """``mosquitto -c <workdir>/mosquitto.conf`` on ``127.0.0.1:<port>`` (a free port unless given).

    :meth:`start` waits until the port accepts connections; :meth:`stop` is a clean SIGTERM (the broker
    writes its persistence database), :meth:`kill` a crash (SIGKILL: only what ``autosave_interval`` saved
    survives), :meth:`restart` stops and starts again on the *same* port with the same state directory.
    Anonymous clients are allowed unless a ``password_file`` is given (or ``allow_anonymous`` says so).
    ``extra`` is appended to the config verbatim; ``verbose`` logs everything, including the
    ``Denied PUBLISH`` lines of ACL refusals (Mosquitto logs those at debug level only).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
        tls: MosquittoTls | None = None,
        persistence: bool = True,
        autosave_interval: int = 1,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int | None = None,
        message_size_limit: int = BROKER_MESSAGE_MAX_BYTES,
        verbose: bool = False,
        extra: str = "",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.password_file = password_file
        self.acl_file = acl_file
        self.allow_anonymous = password_file is None if allow_anonymous is None else allow_anonymous
        self.tls = tls
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.message_size_limit = message_size_limit
        self.verbose = verbose
        self.extra = extra
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.output_path = self.workdir / "mosquitto.out"
        self.persistence_dir = self.workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    # --- configuration ---------------------------------------------------------------------------------

    def config_text(self) -> str:
        """The mosquitto.conf this instance runs with (Mosquitto 2.0 syntax)."""
        lines = [
            "# written by tests.support.mosquitto",
            # As root Mosquitto would switch to the 'mosquitto' user, who cannot read a pytest tmp dir.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines += [
            f"max_queued_messages {self.max_queued_messages}",
            f"message_size_limit {self.message_size_limit}",
        ]
        if self.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.persistence_dir}/",
                f"autosave_interval {self.autosave_interval}",
            ]
        else:
            lines.append("persistence false")
        lines += [
            f"log_dest file {self.log_path}",
            "log_timestamp true",
            "log_timestamp_format %H:%M:%S",
            *(
                ["log_type all"]
                if self.verbose
                else ["log_type error", "log_type warning", "log_type notice"]
            ),
            "connection_messages true",
            f"listener {self.port} {self.host}",
        ]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        if self.extra:
            lines.append(self.extra.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        self.persistence_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self.config_text())
        return self.config_path

    # --- lifecycle -------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> MosquittoProcess:
        """Start and wait for the listener; RuntimeError with the log tail if it exits or never listens."""
        if self.running:
            return self
        if port_in_use(self.host, self.port):
            # Without this a broker already on the port would answer and pass for this one.
            raise RuntimeError(f"port {self.port} on {self.host} is already in use; cannot start mosquitto")
        self.write_config()
        with self.output_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with code {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"mosquitto did not listen on {self.host}:{self.port} within {timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (the persistence database is written on a clean exit); SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a broker crash, for tests of what survives one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 15.0) -> MosquittoProcess:
        """Stop cleanly, then start on the same port with the same state (sessions, queued messages)."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the broker log and of its stdout/stderr (config errors land there)."""
        parts = []
        for path in (self.log_path, self.output_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts) or "(no log output)"

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
