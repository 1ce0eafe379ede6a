"""The cluster's certificates: one CA, the API server's serving certificate, a client certificate
per component (so RBAC and the Node authorizer see real identities), and the ServiceAccount token
signing key. EC P-256 keys: generated in milliseconds."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_IP = "10.0.0.1"
"""First address of --service-cluster-ip-range: the `kubernetes` Service."""

_API_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return key


def _name(common: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class Pki:
    """Creates the files under `directory` on construction."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = KeyPair(directory / "ca.crt", directory / "ca.key")
        self._ca_key = _write_key(self.ca.key)
        self._ca_name = _name("localkube-ca")
        self._write_cert(self.ca.cert, self._ca_key, self._ca_name, ca=True)
        self.sa_key = directory / "sa.key"
        self.sa_pub = directory / "sa.pub"
        sa = _write_key(self.sa_key)
        self.sa_pub.write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.apiserver = self._issue("kube-apiserver", (), server=True)

    def client(self, user: str, *groups: str) -> KeyPair:
        """A client certificate: CN is the user name, O the groups (as kube-apiserver reads them)."""
        return self._issue(user, groups, server=False)

    def serving(self, common: str, directory: Path, hosts: tuple[str, ...] = ("127.0.0.1",)) -> KeyPair:
        """A serving certificate for `hosts` (IP addresses or DNS names), as `tls.crt` and `tls.key`
        in `directory` (the file names controller-runtime's webhook and metrics servers read)."""
        directory.mkdir(parents=True, exist_ok=True)
        pair = KeyPair(directory / "tls.crt", directory / "tls.key")
        key = _write_key(pair.key)
        self._write_cert(pair.cert, key, _name(common), ca=False, server=True, hosts=hosts)
        return pair

    def _issue(self, common: str, groups: tuple[str, ...], *, server: bool) -> KeyPair:
        stem = common.replace(":", "-")
        pair = KeyPair(self.dir / f"{stem}.crt", self.dir / f"{stem}.key")
        key = _write_key(pair.key)
        self._write_cert(pair.cert, key, _name(common, groups), ca=False, server=server)
        return pair

    def _write_cert(
        self,
        path: Path,
        key: ec.EllipticCurvePrivateKey,
        subject: x509.Name,
        *,
        ca: bool,
        server: bool = False,
        hosts: tuple[str, ...] = (*_API_DNS, "127.0.0.1", SERVICE_IP),
    ) -> None:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )
        if not ca:
            purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        builder = builder.add_extension(usage, critical=True)
        if server:
            names = [_general_name(h) for h in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        path.write_bytes(builder.sign(self._ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
