"""A throw-away self-signed certificate for a broker on 127.0.0.1 (the openssl command, as an operator would)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for CN / subjectAltName 127.0.0.1, valid two days; the certificate is its own CA."""
    cert, key = folder / "broker.pem", folder / "broker.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
