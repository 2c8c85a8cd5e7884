"""Throw-away PKI for the DICOM TLS tests, made with the openssl command line (RSA, as DCMTK's BCP 195
profile negotiates ECDHE-RSA): a CA, certificates it signs, and a second CA nobody trusts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    def sha256_colons(self) -> str:
        """`openssl x509 -fingerprint -sha256` as an admin would copy it into the config."""
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(self.cert)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().split("=", 1)[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Cert:
    directory.mkdir(parents=True, exist_ok=True)
    ca = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/O=Test/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(ca.key), "-out", str(ca.cert),
    )  # fmt: skip
    return ca


def issue(ca: Cert, directory: Path, name: str, subject: str, server: bool = False) -> Cert:
    """A certificate for `subject` ("/O=Test/CN=STORESCU") signed by `ca`; `server` adds the loopback
    names (subjectAltName) a client checks the host against."""
    leaf = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(leaf.key), "-out", str(csr)
    )
    ext = directory / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(leaf.cert),
    )  # fmt: skip
    return leaf


@dataclass(frozen=True)
class Pki:
    ca: Cert
    server: Cert  # the node's (and a TLS storescp's) certificate, for 127.0.0.1 / localhost
    storescu: Cert  # client certificate, subject /O=Test/CN=STORESCU
    testscu: Cert  # client certificate, subject /O=Test/CN=TESTSCU
    stranger: Cert  # a client certificate signed by a CA nobody trusts


def make_pki(directory: Path) -> Pki:
    ca = make_ca(directory, "ca")
    other = make_ca(directory / "other", "other-ca")
    return Pki(
        ca=ca,
        server=issue(ca, directory, "server", "/O=Test/CN=127.0.0.1", server=True),
        storescu=issue(ca, directory, "storescu", "/O=Test/CN=STORESCU"),
        testscu=issue(ca, directory, "testscu", "/O=Test/CN=TESTSCU"),
        stranger=issue(other, directory / "other", "stranger", "/O=Test/CN=STORESCU"),
    )
