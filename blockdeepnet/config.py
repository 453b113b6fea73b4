"""TOML configuration of the two daemons (``gateway.toml``, ``agent.toml``): defaults and validation.

Every key is optional except where a value cannot be guessed (the fleet file, the device key). Unknown keys
are errors, not silently ignored: a typo in ``qourum`` must not leave the default in force unnoticed.
Relative paths are resolved against the config file's folder, so a fleet folder can be moved as a whole.
Errors are :class:`ConfigError` with the file, the dotted key and what is expected.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and key."""


def _read_password(path: Path | None, what: str) -> str | None:
    """A password kept in a file of its own (one line, mode 0600), never in a config file."""
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} password file {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach (or, for the gateway, run) the MQTT broker.

    ``mode = "embedded"`` (gateway only) runs amqtt inside the gateway on ``host:port``; ``port = 0`` picks a
    free port. ``"external"`` connects to a broker such as Mosquitto. ``password_file`` holds the client's own
    MQTT password (one line, mode 0600) so it never sits in a config file that is shared or logged.
    """

    mode: str = "external"
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = 30
    client_id: str = ""
    # Embedded broker only: amqtt FileAuthPlugin password file (user:argon2-hash lines), whether the DESIGN §3
    # topic ACL is enforced, and read-only monitor users (dashboards, the demo's display). Without a password
    # file any client that names a username is let in unchecked (loopback demo only); anonymous ones never.
    users_file: Path | None = None
    acl: bool = True
    monitors: str = ""  # comma-separated usernames

    def password(self) -> str | None:
        return _read_password(self.password_file, "broker")


@dataclass(frozen=True)
class RoundsConfig:
    """When the gateway closes a round.

    It closes as soon as ``quorum`` updates are on chain, or when every device that is online (by its retained
    state / last will) has submitted and at least ``min_updates`` are in, or at ``deadline_s`` after opening
    with at least ``min_updates``. With fewer at the deadline it extends the round by ``deadline_s`` up to
    ``max_extensions`` times, then skips it (reason logged, next round on the same base model).
    ``max_rounds = 0`` runs until stopped.
    """

    quorum: int = 0  # 0 = every registered device
    min_updates: int = 2
    deadline_s: float = 300.0
    max_extensions: int = 2
    max_rounds: int = 0
    min_devices: int = 0  # round 1 waits until this many devices are registered (enrolled); 0 = no wait


@dataclass(frozen=True)
class StoreConfig:
    url: str = ""  # empty: SQLite file gateway.db in the state dir


@dataclass(frozen=True)
class HttpConfig:
    """The gateway's HTTP endpoint: ``/metrics``, ``/healthz``, and ``/rpc`` (a read-only JSON-RPC view of the
    embedded chain, so devices can check commits when the chain lives in the gateway). ``port = 0``: a free
    port; ``enabled = false``: no endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    dashboard: bool = True  # the operator dashboard at /dashboard (same listener as /metrics)


@dataclass(frozen=True)
class BridgeConfig:
    """The upstream bridge: the gateway forwards chosen topics to the plant's broker and back.

    ``up`` and ``down`` are MQTT topic filters as the *local* broker spells them; upstream, each topic carries
    ``remote_prefix`` in front (``"plant1/"``: ``bdn/v1/f/round`` up is ``plant1/bdn/v1/f/round`` there, and
    ``plant1/<t>`` down arrives locally as ``<t>``). An empty ``up`` forwards the fleet's ``gateway/state``,
    ``round`` and ``dev/+/state``; filters that overlap between ``up`` and ``down`` would loop messages. A
    message is acknowledged on the side it came from only after the other side has acknowledged it, so a QoS 1
    message survives either broker (or the gateway) going away. ``protocol``: ``"3.1.1"`` or ``"5"``.
    ``password_file``: the upstream password, one line, 0600.
    """

    enabled: bool = False
    host: str = ""
    port: int = 1883
    protocol: str = "3.1.1"
    username: str = ""
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_id: str = ""  # empty: bdn-bridge-<fleet>
    keepalive_s: int = 30
    remote_prefix: str = ""
    up: tuple[str, ...] = ()
    down: tuple[str, ...] = ()
    qos: int = 1

    def up_filters(self, fleet: str) -> tuple[str, ...]:
        """``up``, or when empty what the plant sees by default: the fleet's gateway state, round announcement
        and device states (the gateway's broker credentials may read all three)."""
        p = f"bdn/v1/{fleet}/"
        return self.up or (f"{p}gateway/state", f"{p}round", f"{p}dev/+/state")

    def password(self) -> str | None:
        return _read_password(self.password_file, "bridge")


@dataclass(frozen=True)
class SparkplugConfig:
    """The gateway as a Sparkplug B edge node (``spBv1.0/<group_id>/N…/<edge_node_id>``) for SCADA/historians.

    ``server``: ``"upstream"`` publishes straight to the plant broker of ``[bridge]`` (so the plant broker
    itself sends NDEATH when the gateway dies), ``"local"`` to the gateway's own broker; empty: upstream when
    the bridge is enabled, else local. ``edge_node_id`` defaults to the fleet name.
    """

    enabled: bool = False
    group_id: str = "BlockDeepNet"
    edge_node_id: str = ""
    server: str = ""
    min_interval_s: float = 1.0  # NDATA/DDATA: changes within this interval go out together


@dataclass(frozen=True)
class EnrollConfig:
    """Device enrollment (``POST /enroll`` on the gateway's HTTP endpoint, tokens from ``bdn provision enroll``).

    ``token_key_file``: the fleet's token MAC key (mode 0600); tokens that do not verify under it are forged.
    ``shares_dir``: key shares not yet handed out (``share-<k>.json``); a share file is deleted once the device
    that redeemed it has it. ``mosquitto_passwd`` / ``mosquitto_acl``: files of an external Mosquitto that the
    gateway rewrites when a device joins, then runs ``broker_reload`` (e.g. ``systemctl reload mosquitto``)
    so Mosquitto reads them again. ``ca_file``: the fleet CA certificate handed to devices.
    """

    enabled: bool = False
    token_key_file: Path | None = None
    shares_dir: Path | None = None
    ca_file: Path | None = None
    mosquitto_passwd: Path | None = None
    mosquitto_acl: Path | None = None
    broker_reload: str = ""
    broker_host: str = ""  # the broker host:port devices are told to use (default: the gateway's own view)
    broker_port: int = 0


@dataclass(frozen=True)
class GatewayConfig:
    fleet_file: Path
    key_file: Path  # the gateway's Ethereum key (hex), mode 0600
    state_dir: Path
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    enroll: EnrollConfig = field(default_factory=EnrollConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    sparkplug: SparkplugConfig = field(default_factory=SparkplugConfig)
    max_update_bytes: int = 0  # 0 = wire.UPDATE_MAX_BYTES

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.state_dir / 'gateway.db'}"


@dataclass(frozen=True)
class DataConfig:
    """The device's local training data. ``source = "fashion-mnist-shard"`` takes shard ``shard`` of ``shards``
    of the paper split (simulation and demo); ``"npz"`` reads ``path`` with arrays ``x`` (N,28,28 uint8 or
    float) and ``y`` (N labels)."""

    source: str = "fashion-mnist-shard"
    shard: int = 0
    shards: int = 10
    seed: int = 7
    path: Path | None = None
    data_dir: Path | None = None
    evaluate_test: bool = False  # report accuracy on the Fashion-MNIST test set (demo)


@dataclass(frozen=True)
class TrainConfig:
    """Local training per round. The paper counts local work in minibatch steps (1,500 local iterations):
    ``local_iterations > 0`` runs exactly that many steps, reshuffling the local set at every pass, and
    overrides ``local_epochs``; 0 trains for ``local_epochs`` whole passes (the simulator's default)."""

    rule: str = "fedavg"
    lr: float = 0.2
    batch_size: int = 32
    local_epochs: int = 1
    local_iterations: int = 0


@dataclass(frozen=True)
class SecretsConfig:
    """Where the device key and key share rest. ``files``: ``key_file`` / ``share_file`` (mode 0600).
    ``tpm``: sealed to the TPM 2.0 reached through ``tcti`` (e.g. ``device:/dev/tpmrm0``,
    ``swtpm:host=127.0.0.1,port=2321``), sealed blobs in ``sealed_dir`` (default: ``<state_dir>/sealed``).
    ``keystore``: an encrypted file ``keystore_file`` (default ``<state_dir>/keystore.json``) under the
    passphrase in ``passphrase_file``, for devices without a TPM (a warning says so at start-up)."""

    backend: str = "files"
    tcti: str = "device:/dev/tpmrm0"
    sealed_dir: Path | None = None
    keystore_file: Path | None = None
    passphrase_file: Path | None = None


@dataclass(frozen=True)
class StatusConfig:
    """Status LED and push button. ``backend``: ``auto`` (RPi.GPIO where it imports, else a mock that logs),
    ``gpio``, ``mock`` or ``off``; pins are BCM numbers. ``join``: ``auto`` (take part in every round) or
    ``button`` (an attended device takes part in a round only after its button was pressed; one press, one
    round)."""

    backend: str = "auto"
    led_pin: int = 17
    button_pin: int = 27
    join: str = "auto"


@dataclass(frozen=True)
class AgentConfig:
    fleet_file: Path
    state_dir: Path
    key_file: Path | None = None  # secrets.backend = "files": the device's secp256k1 key (hex), mode 0600
    share_file: Path | None = None  # key holders only: the KeyShare JSON, mode 0600
    gateway_url: str = ""  # the gateway's HTTP endpoint (enrollment, fleet membership updates)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    chain_rpc: str = ""  # JSON-RPC URL to check commits; empty = the fleet's chain URL
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    receipt_timeout_s: float = 30.0
    max_publish_attempts: int = 5
    standby_delay_s: float = 20.0  # a holder outside this round's primary t waits this long before sharing
    min_aggregate_devices: int = 2  # refuse to decrypt an aggregate of fewer updates (it would reveal one)


_T = TypeVar("_T")


def _build(cls: type[_T], raw: dict[str, Any], where: str, base: Path) -> _T:
    """Construct dataclass ``cls`` from a TOML table, type-checking each key and resolving paths."""
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    nested = {
        "broker": BrokerConfig,
        "store": StoreConfig,
        "rounds": RoundsConfig,
        "http": HttpConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "enroll": EnrollConfig,
        "secrets": SecretsConfig,
        "status": StatusConfig,
        "bridge": BridgeConfig,
        "sparkplug": SparkplugConfig,
    }
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        ftype = str(known[name].type)
        if name in nested and isinstance(value, dict):
            values[name] = _build(nested[name], value, key, base)
        elif "Path" in ftype:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key} must be a non-empty path string")
            p = Path(value).expanduser()
            values[name] = p if p.is_absolute() else (base / p)
        elif ftype == "bool":
            if type(value) is not bool:
                raise ConfigError(f"{key} must be true or false, got {value!r}")
            values[name] = value
        elif ftype == "int":
            if type(value) is not int:
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            values[name] = value
        elif ftype == "float":
            if type(value) not in (int, float):
                raise ConfigError(f"{key} must be a number, got {value!r}")
            values[name] = float(value)
        elif ftype == "str":
            if type(value) is not str:
                raise ConfigError(f"{key} must be a string, got {value!r}")
            values[name] = value
        elif ftype == "tuple[str, ...]":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{key} must be a list of non-empty strings, got {value!r}")
            values[name] = tuple(value)
        else:
            raise ConfigError(f"{key} must be a table")
    try:
        return cls(**values)
    except TypeError as exc:
        missing = [n for n, f in known.items() if n not in values and _required(f)]
        raise ConfigError(f"{where or 'config'}: missing required key(s) {', '.join(missing)}") from exc


def _required(f: Any) -> bool:
    from dataclasses import MISSING

    return bool(f.default is MISSING and f.default_factory is MISSING)


def _read(path: str | Path) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh), p.resolve().parent
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc


def _check_broker(b: BrokerConfig, where: str, embedded_ok: bool) -> None:
    modes = ("embedded", "external") if embedded_ok else ("external",)
    if b.mode not in modes:
        raise ConfigError(f"{where}.mode must be one of {', '.join(modes)}, got {b.mode!r}")
    if not 0 <= b.port <= 65535 or (b.port == 0 and b.mode == "external"):
        raise ConfigError(f"{where}.port must be 1..65535 (0 = pick a free one, embedded only), got {b.port}")
    if (b.tls_cert is None) != (b.tls_key is None):
        raise ConfigError(f"{where}: tls_cert and tls_key go together")
    if b.keepalive_s < 5:
        raise ConfigError(f"{where}.keepalive_s must be >= 5")
    if embedded_ok and b.password_file is not None and not b.username:
        # (An agent's username defaults to its device address, so only the gateway must name one.)
        raise ConfigError(f"{where}: password_file needs a username")


def _check_rounds(r: RoundsConfig) -> None:
    if r.quorum < 0 or r.min_updates < 1 or r.max_extensions < 0 or r.max_rounds < 0 or r.min_devices < 0:
        raise ConfigError(
            "rounds: quorum >= 0, min_updates >= 1, max_extensions >= 0, max_rounds >= 0, min_devices >= 0"
        )
    if r.quorum and r.quorum < r.min_updates:
        raise ConfigError(f"rounds.quorum ({r.quorum}) is below rounds.min_updates ({r.min_updates})")
    if not r.deadline_s > 0:
        raise ConfigError("rounds.deadline_s must be positive")


def _check_topic_filter(f: str, key: str) -> None:
    """MQTT's rules for a topic filter: ``+`` a whole level, ``#`` only as the last level, no NUL."""
    levels = f.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise ConfigError(
                f"{key}: {f!r} is not an MQTT topic filter ('+' and '#' stand for whole levels)"
            )
    if "\0" in f or len(f.encode()) > 65535:
        raise ConfigError(f"{key}: {f!r} is not an MQTT topic filter")


def _check_bridge(b: BridgeConfig) -> None:
    if not b.enabled:
        return
    if not b.host:
        raise ConfigError("bridge.enabled needs bridge.host (the plant broker)")
    if not 1 <= b.port <= 65535:
        raise ConfigError(f"bridge.port must be 1..65535, got {b.port}")
    if b.protocol not in ("3.1.1", "5"):
        raise ConfigError(f'bridge.protocol must be "3.1.1" or "5", got {b.protocol!r}')
    if b.qos not in (0, 1):
        raise ConfigError(f"bridge.qos must be 0 or 1, got {b.qos}")
    if (b.tls_cert is None) != (b.tls_key is None):
        raise ConfigError("bridge: tls_cert and tls_key go together")
    if b.password_file is not None and not b.username:
        raise ConfigError("bridge: password_file needs a username")
    if b.keepalive_s < 5:
        raise ConfigError("bridge.keepalive_s must be >= 5")
    if any(c in b.remote_prefix for c in "+#\0"):
        raise ConfigError(f"bridge.remote_prefix may not hold MQTT wildcards, got {b.remote_prefix!r}")
    for name, filters in (("up", b.up), ("down", b.down)):
        for f in filters:
            _check_topic_filter(f, f"bridge.{name}")
    both = sorted(set(b.up) & set(b.down))
    if both:
        raise ConfigError(
            f"bridge: {', '.join(both)} in both up and down would loop messages between brokers"
        )


def _check_sparkplug(sp: SparkplugConfig, bridge: BridgeConfig) -> None:
    if not sp.enabled:
        return
    if sp.server not in ("", "local", "upstream"):
        raise ConfigError(f'sparkplug.server must be "local" or "upstream", got {sp.server!r}')
    if sp.server == "upstream" and not bridge.enabled:
        raise ConfigError('sparkplug.server = "upstream" needs the plant broker in [bridge] (bridge.enabled)')
    for key, value in (("group_id", sp.group_id), ("edge_node_id", sp.edge_node_id)):
        if any(c in value for c in "/+#") or (key == "group_id" and not value):
            raise ConfigError(
                f"sparkplug.{key} must be a non-empty name without '/', '+' or '#', got {value!r}"
            )
    if sp.min_interval_s < 0:
        raise ConfigError("sparkplug.min_interval_s must be >= 0")


def gateway_config(raw: dict[str, Any], base: Path) -> GatewayConfig:
    """Validate a parsed ``gateway.toml`` (``base``: the folder relative paths start from)."""
    cfg = _build(GatewayConfig, raw, "", base)
    _check_broker(cfg.broker, "broker", embedded_ok=True)
    _check_rounds(cfg.rounds)
    if not 0 <= cfg.http.port <= 65535:
        raise ConfigError("http.port must be 0..65535")
    if cfg.max_update_bytes < 0:
        raise ConfigError("max_update_bytes must be >= 0")
    e = cfg.enroll
    if e.enabled and (e.token_key_file is None or e.shares_dir is None):
        raise ConfigError("enroll.enabled needs enroll.token_key_file and enroll.shares_dir")
    if e.enabled and not cfg.http.enabled:
        raise ConfigError("enroll.enabled needs the HTTP endpoint (http.enabled = true)")
    if (e.mosquitto_passwd is None) != (e.mosquitto_acl is None):
        raise ConfigError("enroll: mosquitto_passwd and mosquitto_acl go together")
    if not 0 <= e.broker_port <= 65535:
        raise ConfigError("enroll.broker_port must be 0..65535")
    _check_bridge(cfg.bridge)
    _check_sparkplug(cfg.sparkplug, cfg.bridge)
    if cfg.store.url and not cfg.store.url.startswith(("sqlite:", "postgresql")):
        raise ConfigError(
            f"store.url must be a sqlite:/// or postgresql:// URL, got {cfg.store.url.split(':')[0]}:"
        )
    return cfg


def agent_config(raw: dict[str, Any], base: Path) -> AgentConfig:
    """Validate a parsed ``agent.toml``."""
    cfg = _build(AgentConfig, raw, "", base)
    _check_broker(cfg.broker, "broker", embedded_ok=False)
    d = cfg.data
    if d.source not in ("fashion-mnist-shard", "npz"):
        raise ConfigError(f"data.source must be 'fashion-mnist-shard' or 'npz', got {d.source!r}")
    if d.source == "npz" and d.path is None:
        raise ConfigError("data.path is required when data.source is 'npz'")
    if d.source == "fashion-mnist-shard" and not 0 <= d.shard < d.shards:
        raise ConfigError(f"data.shard must be in 0..{d.shards - 1}")
    t = cfg.train
    if t.rule not in ("fedavg", "eq3") or t.lr <= 0 or t.batch_size < 1 or t.local_epochs < 1:
        raise ConfigError("train: rule 'fedavg'|'eq3', lr > 0, batch_size >= 1, local_epochs >= 1")
    if t.local_iterations < 0:
        raise ConfigError("train.local_iterations must be >= 0 (0 = train for local_epochs)")
    if cfg.receipt_timeout_s <= 0 or cfg.max_publish_attempts < 1 or cfg.standby_delay_s < 0:
        raise ConfigError("receipt_timeout_s > 0, max_publish_attempts >= 1, standby_delay_s >= 0")
    if cfg.min_aggregate_devices < 1:
        raise ConfigError("min_aggregate_devices must be >= 1")
    s = cfg.secrets
    if s.backend not in ("files", "tpm", "keystore"):
        raise ConfigError(f"secrets.backend must be 'files', 'tpm' or 'keystore', got {s.backend!r}")
    if s.backend == "files" and cfg.key_file is None:
        raise ConfigError("key_file is required when secrets.backend is 'files'")
    if s.backend == "keystore" and s.passphrase_file is None:
        raise ConfigError("secrets.passphrase_file is required when secrets.backend is 'keystore'")
    if cfg.status.backend not in ("auto", "gpio", "mock", "off"):
        raise ConfigError(f"status.backend must be auto, gpio, mock or off, got {cfg.status.backend!r}")
    if cfg.status.join not in ("auto", "button"):
        raise ConfigError(f"status.join must be 'auto' or 'button', got {cfg.status.join!r}")
    if cfg.status.join == "button" and cfg.status.backend == "off":
        raise ConfigError("status.join = 'button' needs a button: status.backend must not be 'off'")
    if cfg.gateway_url and not cfg.gateway_url.startswith(("http://", "https://")):
        raise ConfigError("gateway_url must be an http(s) URL")
    return cfg


def load_gateway_config(path: str | Path) -> GatewayConfig:
    raw, base = _read(path)
    try:
        return gateway_config(raw, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_agent_config(path: str | Path) -> AgentConfig:
    raw, base = _read(path)
    try:
        return agent_config(raw, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def toml_text(table: Mapping[str, Any]) -> str:
    """A TOML document from nested dicts of str/int/float/bool (all our configs need)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, sub in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in sub.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
