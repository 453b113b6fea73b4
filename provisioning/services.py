"""``bdn provision install-service``: install a daemon as a hardened systemd service (DESIGN §8).

The unit templates are the files in ``systemd/`` at the top of the repository (found next to this package,
which works for a source checkout and for the editable install ``make`` does; ``$BDN_SYSTEMD_DIR`` points
elsewhere, e.g. for a wheel install, like ``$BDN_CONTRACT_ARTIFACT`` does for the contract). They are valid
units as they stand, for ``bdn`` installed in ``/usr/local/bin``; the installer rewrites that path in
``ExecStart=`` to the ``bdn`` it runs from.

Layout on the machine (the units name these paths)::

    /etc/systemd/system/bdn-<role>.service   the unit (0644)
    /etc/bdn/<role>/<role>.toml               the configuration, paths rewritten   ConfigurationDirectory=
    /etc/bdn/<role>/...                       the files it reads (keys, CA, ...)   bdn:bdn, 0700 / 0600
    /var/lib/bdn/<role>/                      state_dir and every file the daemon   StateDirectory=
                                              writes while it runs (fleet.json, ...)

``ProtectSystem=strict`` leaves the daemon nothing writable but its state directory, so the configuration is
split: files it only reads are copied into ``/etc/bdn/<role>``, files it rewrites at run time go to
``/var/lib/bdn/<role>`` (copied only when absent there, so a re-install never rolls back what the daemon
wrote since), and files another service reads too (Mosquitto's password file and ACL) stay where they are
and are made writable with ``ReadWritePaths=``. ``ProtectHome=`` and ``PrivateTmp=`` hide ``/home``, ``/root``
and ``/tmp`` from the service: anything left in place there is refused up front with the reason.

Every action is a :class:`Step` that prints itself (``--dry-run`` prints the plan and touches nothing).
``root`` installs into another tree (an SD card image, a test folder) the way ``DESTDIR`` does: files go
under it, their contents name the final paths, the user comes from its ``etc/passwd`` and the unit is
enabled offline with ``systemctl --root``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from blockdeepnet.config import (
    AgentConfig,
    ConfigError,
    GatewayConfig,
    load_agent_config,
    load_gateway_config,
    toml_text,
)

Role = Literal["gateway", "agent", "chain-dev"]
ROLES: tuple[Role, ...] = get_args(Role)

DEFAULT_USER = "bdn"
UNIT_DIR = Path("/etc/systemd/system")
CONFIG_ROOT = Path("/etc/bdn")
STATE_ROOT = Path("/var/lib/bdn")
TEMPLATE_BDN = "/usr/local/bin/bdn"
TEMPLATES_ENV = "BDN_SYSTEMD_DIR"
TEMPLATES = Path(__file__).resolve().parent.parent / "systemd"

# The trees the units hide from the service (ProtectHome=yes, PrivateTmp=yes).
HIDDEN_FROM_SERVICE = (Path("/home"), Path("/root"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))
# Where `systemctl enable NAME` finds a unit; a unit elsewhere is enabled by its path.
_UNIT_SEARCH_PATH = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)

# Config keys naming what a daemon writes while it runs (keep in step with gateway/ and firmware_agent/):
# they must end up in its state directory.
WRITTEN_KEYS: dict[str, frozenset[str]] = {
    "gateway": frozenset({"state_dir", "fleet_file", "broker.users_file", "enroll.shares_dir"}),
    "agent": frozenset({"state_dir", "fleet_file", "secrets.sealed_dir", "secrets.keystore_file"}),
}
# Written by the gateway and read by Mosquitto: left where Mosquitto's configuration names them.
SHARED_KEYS = frozenset({"enroll.mosquitto_passwd", "enroll.mosquitto_acl"})


class ServiceInstallError(Exception):
    """The service cannot be installed as asked; the message says what to do instead."""


# ------------------------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class Owner:
    """A user and group, looked up when a step runs (the user may be created by an earlier step), in the
    password and group files of the tree being installed into."""

    user: str
    group: str
    root: Path = Path("/")

    def ids(self) -> tuple[int, int]:
        uid = _lookup_id(self.root, "passwd", self.user)
        gid = _lookup_id(self.root, "group", self.group)
        if uid is None or gid is None:
            raise ServiceInstallError(
                f"user {self.user} / group {self.group} not found in {self.root / 'etc'}; create them first"
            )
        return uid, gid

    def __str__(self) -> str:
        return f"{self.user}:{self.group}"


class Step(ABC):
    """One action of an installation: printable before it runs (``--dry-run``), safe to run again."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what the step does, with the command or paths involved."""

    @abstractmethod
    def run(self) -> None:
        """Do it; an OSError or a failed command is turned into a ServiceInstallError by :func:`run_plan`."""

    def shown(self) -> tuple[Path, str] | None:
        """A file worth showing in a dry run (the unit, the rewritten config) and its text; never a secret."""
        return None


@dataclass(frozen=True)
class Note(Step):
    """Something the operator must know or do; running it does nothing."""

    text: str

    def describe(self) -> str:
        return f"note: {self.text}"

    def run(self) -> None:
        return None


@dataclass(frozen=True)
class RunCommand(Step):
    argv: tuple[str, ...]
    why: str

    def describe(self) -> str:
        return f"{self.why}: {shlex.join(self.argv)}"

    def run(self) -> None:
        done = subprocess.run(self.argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServiceInstallError(
                f"{shlex.join(self.argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}"
            )


@dataclass(frozen=True)
class MakeDirectory(Step):
    path: Path
    mode: int
    owner: Owner | None = None  # None: whoever runs the installer (root)

    def describe(self) -> str:
        return f"create {self.path}/ ({self.mode:04o}{_owned(self.owner)})"

    def run(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _own(self.path, self.mode, self.owner)


@dataclass(frozen=True)
class WriteFile(Step):
    """Write ``text`` atomically (temp file created with the final mode, then renamed over the target)."""

    path: Path
    text: str
    mode: int
    why: str
    owner: Owner | None = None
    show: bool = False

    def describe(self) -> str:
        return f"write {self.path} ({self.mode:04o}{_owned(self.owner)}): {self.why}"

    def run(self) -> None:
        _write_atomic(self.path, self.text.encode(), self.mode, self.owner)

    def shown(self) -> tuple[Path, str] | None:
        return (self.path, self.text) if self.show else None


@dataclass(frozen=True)
class CopyFile(Step):
    """Copy a file the daemon reads; ``keep_existing``: leave a target that exists (the daemon's newer copy)."""

    source: Path
    path: Path
    mode: int
    owner: Owner | None = None
    keep_existing: bool = False

    def describe(self) -> str:
        keep = ", unless already there" if self.keep_existing else ""
        return f"copy {self.source} -> {self.path} ({self.mode:04o}{_owned(self.owner)}{keep})"

    def run(self) -> None:
        if self.keep_existing and self.path.exists():
            return
        _write_atomic(self.path, self.source.read_bytes(), self.mode, self.owner)


@dataclass(frozen=True)
class CopyTree(Step):
    """Copy a folder's files (0600) and subfolders (0700) into ``path``, only when ``path`` is empty or absent:
    moving a daemon's state in on the first install, never overwriting it later."""

    source: Path
    path: Path
    owner: Owner | None = None

    def describe(self) -> str:
        return f"copy {self.source}/ -> {self.path}/ (0600 files, 0700 folders{_owned(self.owner)}, unless it holds anything)"

    def run(self) -> None:
        if self.path.is_dir() and any(self.path.iterdir()):
            return
        self.path.mkdir(parents=True, exist_ok=True)
        _own(self.path, 0o700, self.owner)
        for src in sorted(self.source.rglob("*")):
            dst = self.path / src.relative_to(self.source)
            if src.is_symlink():
                continue
            if src.is_dir():
                dst.mkdir(exist_ok=True)
                _own(dst, 0o700, self.owner)
            elif src.is_file():
                _write_atomic(dst, src.read_bytes(), 0o600, self.owner)


@dataclass(frozen=True)
class Systemctl(Step):
    """A systemctl call. On this machine (``root`` = /) it needs a running systemd; when there is none, the
    error says the files are in place and how to start the unit where systemd runs."""

    argv: tuple[str, ...]
    why: str
    root: Path
    unit_path: Path
    later: str  # the commands to run on a machine booted with systemd

    def describe(self) -> str:
        return f"{self.why}: {shlex.join(self.argv)}"

    def run(self) -> None:
        if shutil.which(self.argv[0]) is None:
            raise ServiceInstallError(
                f"{self.argv[0]} not found; the unit file was written to {self.unit_path}: start it with "
                f"`{self.later}` on a machine run by systemd"
            )
        if self.root == Path("/") and not Path("/run/systemd/system").is_dir():
            raise ServiceInstallError(
                f"systemd is not running on this machine (no /run/systemd/system: a container, or another "
                f"init); the unit file was written to {self.unit_path}: start it with `{self.later}` once "
                "systemd runs"
            )
        RunCommand(self.argv, self.why).run()


def run_plan(steps: Sequence[Step], echo: Callable[[str], None] | None = None) -> None:
    """Run ``steps`` in order, telling ``echo`` about each first; the first failure stops the installation."""
    for k, step in enumerate(steps, 1):
        if echo is not None:
            echo(f"[{k}/{len(steps)}] {step.describe()}")
        try:
            step.run()
        except ServiceInstallError:
            raise
        except OSError as exc:
            raise ServiceInstallError(f"{step.describe()}: {exc}") from exc


def _owned(owner: Owner | None) -> str:
    return "" if owner is None else f", {owner}"


def _own(path: Path, mode: int, owner: Owner | None) -> None:
    if owner is not None:
        os.chown(path, *owner.ids(), follow_symlinks=False)
    os.chmod(path, mode)


def _write_atomic(path: Path, data: bytes, mode: int, owner: Owner | None) -> None:
    """No moment where the content is readable by others or half written: the temp file is created with
    ``mode`` (and owner) before a byte goes in, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.bdn-install")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner.ids())
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _lookup_id(root: Path, table: Literal["passwd", "group"], name: str) -> int | None:
    """uid / gid of ``name`` on this machine (root /) or in ``root/etc/{passwd,group}``."""
    try:
        if root == Path("/"):
            return pwd.getpwnam(name).pw_uid if table == "passwd" else grp.getgrnam(name).gr_gid
        for line in (root / "etc" / table).read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 3 and parts[0] == name:
                return int(parts[2])
    except (KeyError, OSError, ValueError):
        return None
    return None


def _group_members(root: Path, group: str) -> set[str] | None:
    """Members of ``group`` (None when there is no such group)."""
    try:
        if root == Path("/"):
            return set(grp.getgrnam(group).gr_mem)
        for line in (root / "etc" / "group").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[0] == group:
                return {m for m in parts[3].split(",") if m}
    except (KeyError, OSError):
        return None
    return None


# ---------------------------------------------------------------------------------------------- units


def unit_name(role: Role) -> str:
    return f"bdn-{role}.service"


def templates_dir() -> Path:
    """The folder holding the unit templates: ``$BDN_SYSTEMD_DIR``, else ``systemd/`` of the repository."""
    folder = Path(os.environ.get(TEMPLATES_ENV) or TEMPLATES)
    if not (folder / unit_name("gateway")).is_file():
        raise ServiceInstallError(
            f"unit templates not found in {folder}: run from the repository checkout (or an editable install "
            f"of it), or set ${TEMPLATES_ENV} to a folder holding bdn-gateway.service and the others"
        )
    return folder


def _exec_word(path: Path) -> str:
    """``path`` as the first word of ``ExecStart=``: ``%`` escaped (systemd expands specifiers there too) and
    double-quoted when it holds a space. Characters whose treatment differs between systemd versions in that
    position (``$``, quotes, backslashes, control characters) are refused rather than guessed at."""
    text = str(path)
    if not path.is_absolute() or any(c in text for c in "$\\\"'") or not text.isprintable():
        raise ServiceInstallError(
            f"the bdn executable must be an absolute path without $, quotes or backslashes, got {text!r}: "
            "install it elsewhere or pass --bdn"
        )
    escaped = text.replace("%", "%%")
    return f'"{escaped}"' if " " in text else escaped


def render_unit(
    role: Role,
    bdn_path: Path,
    *,
    user: str = DEFAULT_USER,
    read_write_paths: Iterable[Path] = (),
) -> str:
    """The unit for ``role`` as the installer writes it: the template with the real ``bdn`` in ``ExecStart=``,
    ``user`` in ``User=``/``Group=``, and extra writable paths (``-``: a missing one is not an error)."""
    template = (templates_dir() / unit_name(role)).read_text()
    extra = sorted({str(p) for p in read_write_paths})
    out: list[str] = []
    for line in template.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "ExecStart":
            if not value.startswith(TEMPLATE_BDN + " "):
                raise ServiceInstallError(f"{unit_name(role)}: ExecStart= does not start with {TEMPLATE_BDN}")
            line = f"ExecStart={_exec_word(bdn_path)}{value[len(TEMPLATE_BDN) :]}"
        elif sep and key in ("User", "Group"):
            line = f"{key}={user}"
        elif line == "[Install]" and extra:
            out.append("# Files this daemon rewrites that another service reads (installer).")
            out.extend(f"ReadWritePaths=-{p}" for p in extra)
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- plan


def default_bdn_path() -> Path:
    """The ``bdn`` executable of this installation: beside the running interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "bdn"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("bdn")
    if found is None:
        raise ServiceInstallError("cannot find the bdn executable; name it with --bdn")
    return Path(found).absolute()


def hidden_from_service(path: Path) -> Path | None:
    """The sandboxed tree (``/home``, ``/tmp``, ...) that hides ``path`` from the service, if any."""
    for tree in HIDDEN_FROM_SERVICE:
        if path == tree or tree in path.parents:
            return tree
    return None


def _refuse_hidden(path: Path, what: str) -> None:
    tree = hidden_from_service(path)
    if tree is not None:
        raise ServiceInstallError(
            f"{what} {path} lies under {tree}, which the service cannot see (ProtectHome=/PrivateTmp=): "
            "move it elsewhere (e.g. /opt, /srv or /usr/local) and install again"
        )


def _under(root: Path, path: Path) -> Path:
    """The place in the tree being installed into where the final path ``path`` lives."""
    return root / path.relative_to("/")


@dataclass
class _ConfigLayout:
    """Where each file a configuration names goes, and the rewritten configuration."""

    role: Role
    cfg: GatewayConfig | AgentConfig
    config_dir: Path  # final paths, e.g. /etc/bdn/gateway
    state_dir: Path  # e.g. /var/lib/bdn/gateway
    raw: dict[str, Any]
    old_state: Path
    inputs: dict[Path, str]  # source -> file name in config_dir
    written: dict[Path, Path]  # source -> final path in state_dir
    read_write: set[Path]
    notes: list[str]


def _path_keys(obj: Any, prefix: str = "") -> dict[str, Path]:
    """Dotted config key -> path, for every path set in a loaded config (all optional paths default to None,
    so each one found was in the file)."""
    out: dict[str, Path] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.update(_path_keys(value, f"{prefix}{f.name}."))
        elif isinstance(value, Path):
            out[f"{prefix}{f.name}"] = Path(os.path.normpath(value))
    return out


def _set_key(raw: dict[str, Any], dotted: str, value: str) -> None:
    table = raw
    *parents, last = dotted.split(".")
    for name in parents:
        table = table.setdefault(name, {})
    table[last] = value


def _layout(role: Literal["gateway", "agent"], config: Path) -> _ConfigLayout:
    try:
        cfg: GatewayConfig | AgentConfig = (
            load_gateway_config(config) if role == "gateway" else load_agent_config(config)
        )
        with config.open("rb") as fh:
            raw = tomllib.load(fh)
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as exc:
        raise ServiceInstallError(str(exc)) from exc
    config_dir, state_dir = CONFIG_ROOT / role, STATE_ROOT / role
    paths = _path_keys(cfg)
    old_state = paths["state_dir"]
    lay = _ConfigLayout(role, cfg, config_dir, state_dir, raw, old_state, {}, {}, set(), [])
    taken = {f"{role}.toml"}
    for key, path in sorted(paths.items()):
        if key == "state_dir":
            _set_key(raw, key, str(state_dir))
        elif path == old_state or old_state in path.parents:
            _set_key(raw, key, str(state_dir / path.relative_to(old_state)))  # moves with the state
        elif key in WRITTEN_KEYS[role]:
            target = state_dir / path.name
            lay.written[path] = target
            _set_key(raw, key, str(target))
        elif key in SHARED_KEYS:
            _refuse_hidden(path, key)
            lay.read_write.add(path.parent)
            _set_key(raw, key, str(path))
        elif path.is_file():
            name = path.name if path.name not in taken else f"{key.replace('.', '-')}-{path.name}"
            taken.add(name)
            lay.inputs[path] = name
            _set_key(raw, key, name)
        else:
            _refuse_hidden(path, key)
            if not path.exists():
                lay.notes.append(f"{key} = {path} does not exist (yet); the service will look for it there")
            _set_key(raw, key, str(path))
    if lay.inputs or lay.written:
        lay.notes.append(
            f"the service uses the copies; the originals next to {config} are not read by it any more: "
            "keep the secrets among them (keys, shares, passwords) offline or delete them"
        )
    if isinstance(cfg, GatewayConfig):
        _sqlite_store(cfg, lay)
        if cfg.enroll.broker_reload:
            lay.notes.append(
                f"enroll.broker_reload ({cfg.enroll.broker_reload!r}) runs as an unprivileged user with "
                "NoNewPrivileges: allow that user to reload the broker (e.g. a polkit rule for "
                "`systemctl reload mosquitto`), or new devices wait for the next broker reload"
            )
    return lay


def _sqlite_store(cfg: GatewayConfig, lay: _ConfigLayout) -> None:
    """An explicit SQLite ``store.url`` must point into the state directory, the only writable place."""
    url = cfg.store.url
    if not url.startswith("sqlite:"):
        return
    db = Path(os.path.normpath(url.split(":///", 1)[-1]))
    if db == lay.old_state or lay.old_state in db.parents:
        _set_key(lay.raw, "store.url", f"sqlite:///{lay.state_dir / db.relative_to(lay.old_state)}")
        return
    raise ServiceInstallError(
        f"store.url names the SQLite file {db}, which the service could not write (ProtectSystem=strict): "
        f"remove store.url (the default is gateway.db in the state directory) or use PostgreSQL"
    )


def _agent_groups(cfg: AgentConfig) -> list[tuple[str, str]]:
    """(group, why) of the device nodes this agent opens: the TPM (``tss``, Debian's tpm-udev) and the
    Raspberry Pi GPIO registers (``gpio``, Raspberry Pi OS)."""
    out = []
    if cfg.secrets.backend == "tpm" and cfg.secrets.tcti.startswith("device"):
        out.append(("tss", f"the TPM ({cfg.secrets.tcti})"))
    if cfg.status.backend in ("auto", "gpio"):
        out.append(("gpio", "the status LED and button (/dev/gpiomem)"))
    return out


def plan_install(
    role: Role,
    config: Path | None,
    bdn_path: Path,
    *,
    user: str = DEFAULT_USER,
    unit_dir: Path = UNIT_DIR,
    root: Path = Path("/"),
    enable: bool = True,
) -> list[Step]:
    """The steps that install ``role`` as ``bdn-<role>.service`` (see the module docstring for the layout).

    ``config``: the daemon's TOML (gateway, agent; chain-dev takes none). ``bdn_path``: the executable the
    unit runs, as the service will see it. ``enable``: finish with ``systemctl enable --now``.
    Raises :class:`ServiceInstallError` when the configuration cannot work under the unit's sandbox.
    """
    if role not in ROLES:
        raise ServiceInstallError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if (config is None) != (role == "chain-dev"):
        raise ServiceInstallError(
            "chain-dev takes no --config (its state lives in /var/lib/bdn/chain-dev)"
            if role == "chain-dev"
            else f"{role} needs --config (its {role}.toml)"
        )
    _refuse_hidden(bdn_path, "the bdn executable")
    if root == Path("/"):
        _refuse_hidden(TEMPLATES.parent, "the blockdeepnet code at")
    owner = Owner(user, user, root)
    steps: list[Step] = []
    if _lookup_id(root, "passwd", user) is None:
        argv = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(STATE_ROOT)]
        argv += ["--shell", "/usr/sbin/nologin", "--comment", "BlockDeepNet services"]
        argv += ["--prefix", str(root)] if root != Path("/") else []
        steps.append(RunCommand((*argv, user), f"create the system user {user}"))

    read_write: set[Path] = set()
    if role != "chain-dev":
        assert config is not None
        lay = _layout(role, config.absolute())
        if isinstance(lay.cfg, AgentConfig):
            steps += _group_steps(user, root, lay.cfg)
        steps += _config_steps(lay, owner, root)
        read_write = lay.read_write
        steps += [Note(n) for n in lay.notes]

    unit = unit_name(role)
    unit_path = unit_dir / unit
    steps.append(MakeDirectory(_under(root, unit_dir), 0o755))
    steps.append(
        WriteFile(
            _under(root, unit_path),
            render_unit(role, bdn_path, user=user, read_write_paths=read_write),
            0o644,
            "the unit",
            show=True,
        )
    )
    if enable:
        steps += _enable_steps(unit, unit_path, root)
    return steps


def _group_steps(user: str, root: Path, cfg: AgentConfig) -> list[Step]:
    prefix = ("--prefix", str(root)) if root != Path("/") else ()
    steps: list[Step] = []
    for group, why in _agent_groups(cfg):
        members = _group_members(root, group)
        if members is None:
            if group == "tss":
                steps.append(
                    Note(f"no group tss here: make {cfg.secrets.tcti} readable by {user} (Debian: tpm-udev)")
                )
            continue
        if user not in members:
            argv = ("usermod", *prefix, "--append", "--groups", group, user)
            steps.append(RunCommand(argv, f"let {user} open {why}"))
    return steps


def _config_steps(lay: _ConfigLayout, owner: Owner, root: Path) -> list[Step]:
    config_dir, state_dir = _under(root, lay.config_dir), _under(root, lay.state_dir)
    steps: list[Step] = [
        MakeDirectory(config_dir.parent, 0o755),
        MakeDirectory(config_dir, 0o700, owner),
        MakeDirectory(state_dir.parent, 0o755),
    ]
    if lay.old_state.is_dir() and any(lay.old_state.iterdir()):
        steps.append(CopyTree(lay.old_state, state_dir, owner))
    steps.append(MakeDirectory(state_dir, 0o700, owner))
    for source, name in sorted(lay.inputs.items()):
        steps.append(CopyFile(source, config_dir / name, 0o600, owner))
    for source, target in sorted(lay.written.items()):
        if source.is_dir():
            steps.append(CopyTree(source, _under(root, target), owner))
        elif source.is_file():
            steps.append(CopyFile(source, _under(root, target), 0o600, owner, keep_existing=True))
    try:
        text = toml_text(lay.raw)
    except TypeError as exc:
        raise ServiceInstallError(f"cannot rewrite the configuration: {exc}") from exc
    steps.append(
        WriteFile(
            config_dir / f"{lay.role}.toml",
            text,
            0o600,
            f"the {lay.role} configuration, its paths rewritten for the service",
            owner,
            show=True,
        )
    )
    return steps


def _enable_steps(unit: str, unit_path: Path, root: Path) -> list[Step]:
    target = unit if unit_path.parent in _UNIT_SEARCH_PATH else str(unit_path)
    later = f"systemctl daemon-reload && systemctl enable --now {target}"
    if root != Path("/"):
        argv = ("systemctl", f"--root={root}", "enable", target)
        return [
            Systemctl(argv, "enable it in that tree (it starts at the next boot)", root, unit_path, later)
        ]
    return [
        Systemctl(("systemctl", "daemon-reload"), "make systemd read the unit", root, unit_path, later),
        Systemctl(
            ("systemctl", "enable", "--now", "--no-block", target),
            "enable it at boot and start it now",
            root,
            unit_path,
            later,
        ),
    ]


def as_role(name: str) -> Role:
    """``name`` as a :data:`Role` (for command lines that take it as a string)."""
    if name not in ROLES:
        raise ServiceInstallError(f"unknown role {name!r}; one of {', '.join(ROLES)}")
    return name
