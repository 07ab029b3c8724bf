"""A real TLS path to Redis for tests: a throwaway CA and server certificate made at test time, and
stunnel terminating TLS in front of the embedded server (whose bundled binary is built without TLS).
scripts/dev.sh installs Debian's stunnel4 when it is missing."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import wait_for
from tokenspool.redis_server import free_port


@dataclass(frozen=True)
class Certificates:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(directory: Path) -> Certificates:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost (valid for one day)."""
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("tokenspool test CA"))
        .issuer_name(name("tokenspool test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    out = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    out.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    out.key_file.chmod(0o600)
    return out


def stunnel_binary() -> str:
    found = shutil.which("stunnel4") or shutil.which("stunnel")
    if found is None:
        raise AssertionError("stunnel is not installed (scripts/dev.sh test installs Debian's stunnel4)")
    return found


class TLSProxy:
    """stunnel accepting TLS on a free loopback port and forwarding to ``target_port`` in clear."""

    def __init__(self, target_port: int, certificates: Certificates, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.config = directory / "stunnel.conf"
        self.config.write_text(
            "foreground = yes\n"
            "pid =\n"
            f"output = {directory / 'stunnel.log'}\n"
            "[redis]\n"
            f"accept = 127.0.0.1:{self.port}\n"
            f"connect = 127.0.0.1:{target_port}\n"
            f"cert = {certificates.cert_file}\n"
            f"key = {certificates.key_file}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TLSProxy:
        self.process = subprocess.Popen(
            [stunnel_binary(), str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        log = self.directory / "stunnel.log"

        def listening() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"stunnel exited:\n{log.read_text() if log.exists() else ''}")
            return log.exists() and "Configuration successful" in log.read_text()

        wait_for(listening, 10, "stunnel to listen")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
