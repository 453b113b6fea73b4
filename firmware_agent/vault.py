"""Where the device's secrets rest: 0600 files, sealed to the TPM 2.0, or an encrypted keystore file.

The device key (:data:`DEVICE_KEY`, 32 raw secp256k1 bytes) and a holder's key share (:data:`KEY_SHARE`, the
KeyShare JSON) are the two secrets of a device. :func:`open_vault` returns the backend ``agent.toml`` chooses
(``secrets.backend``):

``files``
    The historical layout: ``key_file`` (64 hex digits) and ``share_file`` (JSON), mode 0600. Not sealed:
    a copy of the SD card is a copy of the key.
``tpm``
    Sealed to the device's TPM 2.0 (tpm2-pytss ESAPI over ``secrets.tcti``). A TPM seals at most 128 bytes in
    one object and a 2048-bit key share is ~2 KB, so each secret is encrypted (AES-256-GCM) under a fresh
    random 32-byte data key and only that data key is sealed: a keyedhash sealed-data object under a storage
    primary key that the TPM re-derives from its owner seed on every use. The object is ``fixedTPM`` |
    ``fixedParent``, so its private blob is wrapped by a key that only this TPM can derive: copied to another
    TPM (or to this one after a TPM clear) it fails the TPM's integrity check and does not unseal. Files per
    secret in ``sealed_dir``: ``<name>.pub`` / ``<name>.priv`` (the sealed object's TPM2B_PUBLIC /
    TPM2B_PRIVATE) and ``<name>.enc`` (version byte, GCM nonce, ciphertext), all 0600.
``keystore``
    For devices without a TPM: one JSON file, each entry AES-256-GCM encrypted under a key derived with
    scrypt (random salt) from the passphrase in ``passphrase_file``. It is only as safe as that file, and
    every open says so in a WARNING.

Every backend binds the ciphertext to the secret's name (GCM associated data), so entries or blob sets
swapped between names fail instead of handing the key share out as the device key. No message, ``repr`` or
:class:`VaultStatus` contains secret bytes. Every problem is an :class:`AgentSetupError` that says what to
check.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from blockdeepnet.config import AgentConfig
from blockdeepnet.private_files import write_private_atomic as core_write_private_atomic
from firmware_agent.errors import AgentSetupError
from firmware_agent.keys import (
    DEVICE_KEY,
    KEY_SHARE,
    device_key_from_hex,
    read_private_bytes,
    read_private_file,
)

__all__ = [
    "DEVICE_KEY",
    "KEY_SHARE",
    "FilesVault",
    "KeystoreVault",
    "TpmVault",
    "Vault",
    "VaultStatus",
    "open_vault",
    "write_private_atomic",
]

logger = logging.getLogger("firmware_agent.vault")

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}\Z")  # names become file names: no dots, no slashes
_LABELS = {DEVICE_KEY: "device key", KEY_SHARE: "key share"}
NOT_SEALED = "not sealed: a copy of the disk is a copy of the key"


def _label(name: str) -> str:
    return _LABELS.get(name, f"secret {name!r}")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"a secret name is 1-64 of a-z, 0-9 and '-', got {name!r}")


@dataclass(frozen=True)
class VaultStatus:
    """What ``bdn agent keys --status`` shows: the backend, where it keeps things, which secrets it holds, and
    why it is weaker than a TPM (or that the TPM cannot be reached); never any secret bytes."""

    kind: str
    where: str
    names: tuple[str, ...]
    warning: str = ""


class Vault(ABC):
    """A named-secret store. ``put`` replaces atomically (0600 files in 0700 folders it creates); ``get`` raises
    :class:`AgentSetupError` for a missing, damaged or foreign secret; ``has`` only looks for it."""

    kind: ClassVar[str]

    @abstractmethod
    def put(self, name: str, secret: bytes) -> None:
        """Store ``secret`` under ``name``, replacing what was there."""

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The secret stored under ``name``."""

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether something is stored under ``name`` (``get`` may still find it damaged)."""

    @abstractmethod
    def status(self) -> VaultStatus:
        """Backend, location, stored names and a warning, for an operator."""

    @abstractmethod
    def location(self, name: str) -> str:
        """Where the secret ``name`` rests (a path, plus the TPM for sealed ones), for messages."""

    def describe(self, name: str) -> str:
        """``name`` and where it rests, as the subject of an error message (``device key in keystore ...``)."""
        return f"{_label(name)} in {self.location(name)}"


def write_private_atomic(path: Path, data: bytes, what: str) -> None:
    """:func:`blockdeepnet.private_files.write_private_atomic` into a folder created 0700 if missing; a
    failure is an :class:`AgentSetupError` naming ``what`` (never the secret)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        core_write_private_atomic(path, data)
    except OSError as exc:
        raise AgentSetupError(f"cannot write {what} {path}: {exc.strerror}") from None


# ------------------------------------------------------------------------------------------------- files


class FilesVault(Vault):
    """``key_file`` (64 hex digits) and ``share_file`` (KeyShare JSON), read with the checks of
    :func:`~firmware_agent.keys.read_private_file` (mode 0600 or stricter, no symlinks)."""

    kind = "files"

    def __init__(self, key_file: Path | None, share_file: Path | None) -> None:
        self.key_file = key_file
        self.share_file = share_file

    def __repr__(self) -> str:
        return f"FilesVault(key_file={self.key_file}, share_file={self.share_file})"

    def _configured(self, name: str) -> Path | None:
        if name == DEVICE_KEY:
            return self.key_file
        if name == KEY_SHARE:
            return self.share_file
        raise ValueError(f"the files backend keeps only {DEVICE_KEY} and {KEY_SHARE}, not {name!r}")

    def _path(self, name: str) -> Path:
        path = self._configured(name)
        if path is None:
            key = "key_file" if name == DEVICE_KEY else "share_file"
            raise AgentSetupError(f"secrets.backend is 'files' but {key} is not set in agent.toml")
        return path

    def put(self, name: str, secret: bytes) -> None:
        path = self._path(name)
        if name == DEVICE_KEY:
            if len(secret) != 32:
                raise ValueError(f"a device key is 32 bytes, got {len(secret)}")
            data = secret.hex().encode("ascii") + b"\n"
        else:
            if not secret.isascii():
                raise ValueError("a key share file holds ASCII JSON")
            data = secret
        write_private_atomic(path, data, f"{_label(name)} file")

    def get(self, name: str) -> bytes:
        path = self._path(name)
        if name == DEVICE_KEY:
            return device_key_from_hex(read_private_file(path, "device key file"), self.describe(name))
        return read_private_file(path, "key share file").encode("ascii")

    def has(self, name: str) -> bool:
        path = self._configured(name)
        return path is not None and os.path.lexists(path)

    def location(self, name: str) -> str:
        path = self._configured(name)
        return str(path) if path is not None else "(not configured)"

    def describe(self, name: str) -> str:
        return f"{_label(name)} file {self.location(name)}"

    def status(self) -> VaultStatus:
        share = str(self.share_file) if self.share_file is not None else "(not set)"
        return VaultStatus(
            kind=self.kind,
            where=f"key_file {self.location(DEVICE_KEY)}, share_file {share}",
            names=tuple(n for n in (DEVICE_KEY, KEY_SHARE) if self.has(n)),
            warning=f"{NOT_SEALED} (secrets.backend = 'tpm' seals them to this device's TPM)",
        )


# --------------------------------------------------------------------------------------------------- TPM

_ENVELOPE_VERSION = b"\x01"
_BLOB_SUFFIXES = (".pub", ".priv", ".enc")


def _envelope_aad(kind: str, name: str) -> bytes:
    return f"bdn-vault/{kind}/v1\0{name}".encode()


class TpmVault(Vault):
    """Secrets sealed to the TPM 2.0 reached through ``tcti`` (see the module docstring for the scheme).

    Each operation opens its own ESAPI context, re-creates the primary, and flushes every object and closes
    the context before returning: the agent never holds the TPM (``/dev/tpmrm0`` is shared with other
    services, and swtpm or a TPM without a resource manager has only a few object slots).
    """

    kind = "tpm"

    def __init__(self, tcti: str, sealed_dir: Path) -> None:
        self.tcti = tcti
        self.sealed_dir = sealed_dir

    def __repr__(self) -> str:
        return f"TpmVault(tcti={self.tcti!r}, sealed_dir={self.sealed_dir})"

    def _paths(self, name: str) -> tuple[Path, Path, Path]:
        _check_name(name)
        pub, priv, enc = (self.sealed_dir / f"{name}{suffix}" for suffix in _BLOB_SUFFIXES)
        return pub, priv, enc

    def location(self, name: str) -> str:
        return f"{self.sealed_dir / name}.{{pub,priv,enc}} (TPM {self.tcti})"

    def describe(self, name: str) -> str:
        return f"{_label(name)} sealed in {self.location(name)}"

    def put(self, name: str, secret: bytes) -> None:
        pub_path, priv_path, enc_path = self._paths(name)
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(12)
        envelope = (
            _ENVELOPE_VERSION
            + nonce
            + AESGCM(data_key).encrypt(nonce, secret, _envelope_aad(self.kind, name))
        )
        tss = _tss()
        with self._session(f"seal the {_label(name)}") as (esapi, primary):
            sensitive = tss.TPM2B_SENSITIVE_CREATE(
                tss.TPMS_SENSITIVE_CREATE(data=tss.TPM2B_SENSITIVE_DATA(data_key))
            )
            private, public, *_ = esapi.create(primary, sensitive, _sealed_template(tss))
        try:
            self.sealed_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.sealed_dir, 0o700)
        except OSError as exc:
            raise AgentSetupError(f"cannot use sealed_dir {self.sealed_dir}: {exc.strerror}") from None
        # A crash between these three leaves a mismatched set, which get() reports as damaged; put again.
        write_private_atomic(pub_path, bytes(public.marshal()), "sealed public blob")
        write_private_atomic(priv_path, bytes(private.marshal()), "sealed private blob")
        write_private_atomic(enc_path, envelope, "sealed secret")

    def get(self, name: str) -> bytes:
        paths = self._paths(name)
        present = [p for p in paths if os.path.lexists(p)]
        if not present:
            raise AgentSetupError(
                f"no {_label(name)} is sealed in {self.sealed_dir} (secrets.backend = 'tpm'): seal it with "
                "`bdn agent keys --import` or `bdn agent enroll`"
            )
        if len(present) < len(paths):
            missing = ", ".join(p.name for p in paths if p not in present)
            raise AgentSetupError(
                f"{self.describe(name)} is incomplete ({missing} missing); seal the secret again"
            )
        pub_raw, priv_raw, envelope = (read_private_bytes(p, "sealed secret file") for p in paths)
        if envelope[:1] != _ENVELOPE_VERSION or len(envelope) < 1 + 12 + 16:
            raise AgentSetupError(f"{paths[2]} is not a sealed secret of this format; seal the secret again")
        tss = _tss()
        public = _unmarshal(tss, tss.TPM2B_PUBLIC, pub_raw, paths[0])
        private = _unmarshal(tss, tss.TPM2B_PRIVATE, priv_raw, paths[1])
        with self._session(f"unseal the {_label(name)}") as (esapi, primary):
            handle = esapi.load(primary, private, public)
            try:
                data_key = bytes(esapi.unseal(handle))
            finally:
                esapi.flush_context(handle)
        nonce, body = envelope[1:13], envelope[13:]
        try:
            return AESGCM(data_key).decrypt(nonce, body, _envelope_aad(self.kind, name))
        except (InvalidTag, ValueError):
            raise AgentSetupError(
                f"{self.describe(name)} does not decrypt under its sealed key: the files are damaged or do "
                "not belong together (a put interrupted by a crash, or files copied from elsewhere); seal the "
                "secret again"
            ) from None

    def has(self, name: str) -> bool:
        return all(os.path.lexists(p) for p in self._paths(name))

    def status(self) -> VaultStatus:
        names = tuple(n for n in (DEVICE_KEY, KEY_SHARE) if self.has(n))
        warning = ""
        try:
            with self._session("create the storage key"):
                pass
        except AgentSetupError as exc:
            warning = str(exc)
        return VaultStatus(
            kind=self.kind,
            where=f"TPM {self.tcti}, sealed blobs in {self.sealed_dir}",
            names=names,
            warning=warning,
        )

    @contextlib.contextmanager
    def _session(self, doing: str) -> Iterator[tuple[Any, Any]]:
        """An ESAPI context and the storage primary in it; both are gone when the block ends. TSS errors
        inside the block become :class:`AgentSetupError` naming what to check."""
        tss = _tss()
        try:
            esapi = tss.ESAPI(self.tcti)
        except tss.TSS2_Exception as exc:
            raise self._explain(exc, doing) from None
        try:
            primary = None
            try:
                primary, *_ = esapi.create_primary(
                    tss.TPM2B_SENSITIVE_CREATE(), _primary_template(tss), tss.ESYS_TR.OWNER
                )
                yield esapi, primary
            except tss.TSS2_Exception as exc:
                raise self._explain(exc, doing) from None
            finally:
                if primary is not None:
                    with contextlib.suppress(tss.TSS2_Exception):
                        esapi.flush_context(primary)
        finally:
            with contextlib.suppress(tss.TSS2_Exception):
                esapi.close()

    def _explain(self, exc: Exception, doing: str) -> AgentSetupError:
        """A TSS error as a message that says what to check; the TSS text is kept for the record."""
        tss = _tss()
        rc = int(getattr(exc, "rc", 0))
        layer = rc & int(tss.TSS2_RC.RC_LAYER_MASK)
        code = int(getattr(exc, "error", rc)) & ~int(tss.TSS2_RC.RC_LAYER_MASK)
        where = f"the TPM at secrets.tcti = {self.tcti!r}"
        if layer == int(tss.TSS2_RC.TCTI_RC_LAYER):
            return AgentSetupError(
                f"cannot reach {where} to {doing} ({exc}): is the TPM present and may this user open it "
                "(/dev/tpmrm0 belongs to group tss), is swtpm running, and is the tcti string right?"
            )
        if layer in (int(tss.TSS2_RC.TPM_RC_LAYER), int(tss.TSS2_RC.RESMGR_TPM_RC_LAYER)):
            if code == int(tss.TPM2_RC.INTEGRITY):
                return AgentSetupError(
                    f"{where} cannot {doing} ({exc}): it was sealed by another TPM, or this TPM was cleared "
                    "since, or the sealed files are damaged; seal it again from its source (bdn agent keys "
                    "--import, or a new enrollment)"
                )
            if code in (int(tss.TPM2_RC.BAD_AUTH), int(tss.TPM2_RC.AUTH_FAIL)):
                return AgentSetupError(
                    f"{where} refused to {doing} ({exc}): its owner hierarchy has a password; the agent "
                    "needs an owner hierarchy without one (tpm2_changeauth -c owner)"
                )
            if code == int(tss.TPM2_RC.HIERARCHY):
                return AgentSetupError(f"{where} cannot {doing} ({exc}): its owner hierarchy is disabled")
        return AgentSetupError(f"{where} could not {doing}: {exc}")


def _tss() -> Any:
    """The tpm2_pytss namespace, loaded on first use so the files and keystore backends need no libtss2."""
    # libtss2 writes its own log lines straight to stderr (e.g. the TPM's answer to a blob sealed elsewhere);
    # the AgentSetupError already says what happened, so keep it quiet unless the user asks for TSS2_LOG.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss
    except ImportError as exc:
        raise AgentSetupError(
            f"secrets.backend is 'tpm' but tpm2-pytss cannot be loaded ({exc}): install blockdeepnet[agent] "
            "and Debian's libtss2 packages (libtss2-esys, libtss2-tcti-device)"
        ) from None
    return tpm2_pytss


def _unmarshal(tss: Any, cls: Any, raw: bytes, path: Path) -> Any:
    """A TPM2B structure from a blob file that must hold exactly one and nothing after it."""
    try:
        value, used = cls.unmarshal(raw)
    except (tss.TSS2_Exception, TypeError, ValueError):
        used, value = -1, None
    if used != len(raw):
        raise AgentSetupError(f"{path} is not a TPM blob (damaged?); seal the secret again")
    return value


def _primary_template(tss: Any) -> Any:
    """The storage primary: ECC P-256 restricted decryption key, AES-128-CFB for its children, SHA-256 names.

    The same template on the same owner seed always yields the same key, so it need not be persisted in the
    TPM's NV (the agent leaves no handle behind). ECC, not RSA: a TPM derives an ECC primary in milliseconds,
    an RSA-2048 one can take seconds, and this happens on every get and put. ``noDA``: an empty auth value
    cannot be guessed wrong, so this key must never count toward the TPM's dictionary-attack lockout.
    """
    a = tss.TPMA_OBJECT
    return tss.TPM2B_PUBLIC(
        tss.TPMT_PUBLIC(
            type=tss.TPM2_ALG.ECC,
            nameAlg=tss.TPM2_ALG.SHA256,
            objectAttributes=a.FIXEDTPM
            | a.FIXEDPARENT
            | a.SENSITIVEDATAORIGIN
            | a.USERWITHAUTH
            | a.NODA
            | a.RESTRICTED
            | a.DECRYPT,
            parameters=tss.TPMU_PUBLIC_PARMS(
                eccDetail=tss.TPMS_ECC_PARMS(
                    symmetric=tss.TPMT_SYM_DEF_OBJECT(
                        algorithm=tss.TPM2_ALG.AES,
                        keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
                        mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB),
                    ),
                    scheme=tss.TPMT_ECC_SCHEME(scheme=tss.TPM2_ALG.NULL),
                    curveID=tss.TPM2_ECC.NIST_P256,
                    kdf=tss.TPMT_KDF_SCHEME(scheme=tss.TPM2_ALG.NULL),
                )
            ),
        )
    )


def _sealed_template(tss: Any) -> Any:
    """A sealed data object: keyedhash with no scheme, ``fixedTPM | fixedParent`` (cannot be duplicated to
    another TPM or parent), ``userWithAuth`` with an empty auth value (the device must unseal unattended at
    boot; the binding is to the TPM, not to a password), ``noDA``."""
    a = tss.TPMA_OBJECT
    return tss.TPM2B_PUBLIC(
        tss.TPMT_PUBLIC(
            type=tss.TPM2_ALG.KEYEDHASH,
            nameAlg=tss.TPM2_ALG.SHA256,
            objectAttributes=a.FIXEDTPM | a.FIXEDPARENT | a.USERWITHAUTH | a.NODA,
            parameters=tss.TPMU_PUBLIC_PARMS(
                keyedHashDetail=tss.TPMS_KEYEDHASH_PARMS(
                    scheme=tss.TPMT_KEYEDHASH_SCHEME(scheme=tss.TPM2_ALG.NULL)
                )
            ),
        )
    )


# ---------------------------------------------------------------------------------------------- keystore

_KEYSTORE_FORMAT = "bdn-keystore"
_KEYSTORE_VERSION = 1
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 15, 8, 1  # 32 MiB, ~0.1 s on a PC and about 1 s on a Raspberry Pi 3
_SCRYPT_MAX_BYTES = 256 << 20  # refuse files that ask for more memory than a Pi can spare
_CHECK = "check"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    return base64.b64decode(text, validate=True)


class KeystoreVault(Vault):
    """An encrypted keystore file for devices without a TPM.

    Layout (JSON): ``format``, ``version``, ``kdf`` (scrypt ``n``, ``r``, ``p``, base64 ``salt``), ``check``
    (a GCM tag over nothing, so a wrong passphrase is told apart from a damaged entry) and ``entries`` (name ->
    base64 of nonce + ciphertext). The salt is drawn when the file is created and kept for its life; each put
    encrypts with a fresh nonce. Entry names are not secret and stay readable, so ``status`` needs no
    passphrase to list them.
    """

    kind = "keystore"

    def __init__(self, keystore_file: Path, passphrase_file: Path) -> None:
        self.keystore_file = keystore_file
        self.passphrase_file = passphrase_file
        self._derived: tuple[tuple[bytes, int, int, int], bytes] | None = None
        logger.warning(
            "no TPM: the device's secrets are in keystore %s, encrypted under the passphrase in %s; they are "
            "only as safe as that passphrase file",
            keystore_file,
            passphrase_file,
        )

    def __repr__(self) -> str:
        return f"KeystoreVault(keystore_file={self.keystore_file}, passphrase_file={self.passphrase_file})"

    def location(self, name: str) -> str:
        return str(self.keystore_file)

    def describe(self, name: str) -> str:
        return f"{_label(name)} in keystore {self.keystore_file}"

    def _damaged(self, why: str) -> AgentSetupError:
        return AgentSetupError(
            f"keystore {self.keystore_file} is damaged or not a BlockDeepNet keystore ({why}); restore it or "
            "import the secrets again"
        )

    def _read(self) -> dict[str, Any] | None:
        """The parsed, structurally checked keystore, or None when there is no file yet."""
        if not os.path.lexists(self.keystore_file):
            return None
        raw = read_private_bytes(self.keystore_file, "keystore file")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except ValueError:
            raise self._damaged("not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != _KEYSTORE_FORMAT:
            raise self._damaged(f"no format = {_KEYSTORE_FORMAT!r}")
        if doc.get("version") != _KEYSTORE_VERSION:
            raise AgentSetupError(
                f"keystore {self.keystore_file} has version {doc.get('version')!r}; this agent reads version "
                f"{_KEYSTORE_VERSION}"
            )
        kdf, entries = doc.get("kdf"), doc.get("entries")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise self._damaged("kdf must be scrypt")
        n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
        if not (isinstance(n, int) and isinstance(r, int) and isinstance(p, int)):
            raise self._damaged("scrypt n, r, p must be integers")
        if (
            n < 1 << 14
            or n & (n - 1)
            or not 1 <= r <= 32
            or not 1 <= p <= 16
            or 128 * n * r > _SCRYPT_MAX_BYTES
        ):
            raise self._damaged(f"scrypt parameters n={n}, r={r}, p={p} out of range")
        try:
            salt = _unb64(kdf.get("salt"))
            _unb64(doc.get("check"))
            if not isinstance(entries, dict):
                raise ValueError("entries must be an object")
            for name, value in entries.items():
                _check_name(name)
                _unb64(value)
        except (ValueError, binascii.Error) as exc:
            raise self._damaged(str(exc)) from None
        if not 16 <= len(salt) <= 64:
            raise self._damaged("salt must be 16-64 bytes")
        return doc

    def _passphrase(self) -> bytes:
        text = read_private_file(self.passphrase_file, "keystore passphrase file").strip()
        if not text:
            raise AgentSetupError(f"keystore passphrase file {self.passphrase_file} is empty")
        return text.encode("ascii")

    def _key(self, doc: dict[str, Any]) -> AESGCM:
        """The keystore's AES key, derived once per vault object, after checking the passphrase opens it."""
        kdf = doc["kdf"]
        params = (_unb64(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
        if self._derived is None or self._derived[0] != params:
            salt, n, r, p = params
            key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(self._passphrase())
            self._derived = (params, key)
        aes = AESGCM(self._derived[1])
        check = _unb64(doc["check"])
        try:
            aes.decrypt(check[:12], check[12:], _envelope_aad(self.kind, _CHECK))
        except (InvalidTag, ValueError):
            self._derived = None
            raise AgentSetupError(
                f"the passphrase in {self.passphrase_file} does not open keystore {self.keystore_file} (wrong "
                "passphrase, or the keystore was written under another one)"
            ) from None
        return aes

    def _new(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": _KEYSTORE_FORMAT,
            "version": _KEYSTORE_VERSION,
            "kdf": {
                "name": "scrypt",
                "n": _SCRYPT_N,
                "r": _SCRYPT_R,
                "p": _SCRYPT_P,
                "salt": _b64(os.urandom(16)),
            },
            "check": "",
            "entries": {},
        }
        salt = _unb64(doc["kdf"]["salt"])
        key = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(self._passphrase())
        self._derived = ((salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P), key)
        nonce = os.urandom(12)
        doc["check"] = _b64(nonce + AESGCM(key).encrypt(nonce, b"", _envelope_aad(self.kind, _CHECK)))
        return doc

    def put(self, name: str, secret: bytes) -> None:
        _check_name(name)
        doc = self._read() or self._new()
        aes = self._key(doc)
        nonce = os.urandom(12)
        doc["entries"][name] = _b64(nonce + aes.encrypt(nonce, secret, _envelope_aad(self.kind, name)))
        write_private_atomic(
            self.keystore_file, json.dumps(doc, indent=1).encode("ascii") + b"\n", "keystore"
        )

    def get(self, name: str) -> bytes:
        _check_name(name)
        doc = self._read()
        if doc is None:
            raise AgentSetupError(
                f"keystore {self.keystore_file} does not exist (secrets.backend = 'keystore'): create it with "
                "`bdn agent keys --import` or `bdn agent enroll`"
            )
        if name not in doc["entries"]:
            raise AgentSetupError(f"keystore {self.keystore_file} holds no {_label(name)}")
        aes = self._key(doc)
        blob = _unb64(doc["entries"][name])
        try:
            return aes.decrypt(blob[:12], blob[12:], _envelope_aad(self.kind, name))
        except (InvalidTag, ValueError):
            raise AgentSetupError(
                f"the {_label(name)} entry of keystore {self.keystore_file} is damaged (it fails authentication "
                "under the right passphrase); import the secret again"
            ) from None

    def has(self, name: str) -> bool:
        _check_name(name)
        doc = self._read()
        return doc is not None and name in doc["entries"]

    def status(self) -> VaultStatus:
        warning = f"no TPM: {NOT_SEALED}; the secrets are only as safe as the passphrase file {self.passphrase_file}"
        names: tuple[str, ...] = ()
        try:
            doc = self._read()
            if doc is not None:
                names = tuple(sorted(doc["entries"]))
                self._key(doc)
        except AgentSetupError as exc:
            warning = f"{warning}. {exc}"
        return VaultStatus(
            kind=self.kind,
            where=f"keystore {self.keystore_file} (passphrase in {self.passphrase_file})",
            names=names,
            warning=warning,
        )


# ------------------------------------------------------------------------------------------------- open


def open_vault(cfg: AgentConfig) -> Vault:
    """The vault ``cfg.secrets.backend`` names. Opening touches nothing (no TPM session, no passphrase read)
    except that a keystore logs its warning; problems surface on the first ``get`` or ``put``."""
    s = cfg.secrets
    if s.backend == "files":
        return FilesVault(cfg.key_file, cfg.share_file)
    if s.backend == "tpm":
        return TpmVault(s.tcti, s.sealed_dir or cfg.state_dir / "sealed")
    if s.backend == "keystore":
        if s.passphrase_file is None:
            raise AgentSetupError("secrets.passphrase_file is required when secrets.backend is 'keystore'")
        return KeystoreVault(s.keystore_file or cfg.state_dir / "keystore.json", s.passphrase_file)
    raise AgentSetupError(f"secrets.backend must be 'files', 'tpm' or 'keystore', got {s.backend!r}")
