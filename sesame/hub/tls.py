"""
TLS material for the hub: a private CA and a hub certificate, created on first
start in the data directory and reused afterwards.

Files in ``data_dir`` (the directory is created with mode 0700):

``ca.pem``
    The private CA certificate.  This is the only file users copy: remotes and
    clients trust it (``--ca FILE`` / ``SESAME_CA`` / ``ca=``).
``ca-key.pem`` (0600)
    The CA's private key.  Needed again only to reissue ``hub.pem`` or to issue
    client certificates (:func:`issue_client_cert`).
``hub.pem``, ``hub-key.pem`` (0600)
    The hub's serving certificate and key, signed by the CA, with a SAN for
    every host it was asked to cover plus ``localhost``, ``127.0.0.1`` and
    ``::1``.

:func:`ensure_hub_tls` is idempotent: it creates what is missing, keeps a valid
CA forever (so a ``ca.pem`` that was handed out keeps working) and reissues
only the hub certificate when it no longer fits (a requested host missing from
its SANs, close to expiry, not signed by the CA on disk, or not matching its
key).  A reissued certificate keeps the SANs of the one it replaces, so names
clients already use stay valid.

Key material is never logged; log lines carry paths and host names only.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

try:  # POSIX only; elsewhere concurrent first starts are simply not serialized.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "HUB_CERT_FILE",
    "HUB_KEY_FILE",
    "LOCAL_HOSTS",
    "HubTLS",
    "TLSSetupError",
    "adopt_cluster_ca",
    "channel_credentials",
    "cluster_ca_bundle",
    "ensure_hub_tls",
    "issue_client_cert",
]

log = logging.getLogger("sesame.tls")

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
HUB_CERT_FILE = "hub.pem"
HUB_KEY_FILE = "hub-key.pem"
LOCK_FILE = "tls.lock"

#: Always covered by the hub certificate, whatever the listen address.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

CA_DAYS = 3650
LEAF_DAYS = 825
#: A hub certificate with less than this left is reissued at the next start.
RENEW_BEFORE = datetime.timedelta(days=30)
#: Backdating absorbs small clock differences between hub and peers.
BACKDATE = datetime.timedelta(minutes=5)


class TLSSetupError(Exception):
    """The data directory holds TLS files that cannot be used or repaired safely."""


@dataclass(frozen=True)
class HubTLS:
    """The hub's TLS material: where it lives and what it holds.

    :ivar created: True when this call created the CA, i.e. ``ca_path`` is new
        and the user should be told where it is (once).
    :ivar reissued: True when this call (re)issued the hub certificate (always
        True when ``created`` is).
    :ivar hosts: the SANs of the hub certificate, as strings.
    """

    data_dir: Path
    ca_path: Path
    ca_key_path: Path
    cert_path: Path
    key_path: Path
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    hosts: tuple[str, ...]
    created: bool
    reissued: bool

    def server_credentials(
        self, require_client_cert: bool = False, client_ca: bytes | None = None
    ) -> grpc.ServerCredentials:
        """Credentials for ``server.add_secure_port``, serving ``hub.pem``.

        :param require_client_cert: refuse TLS handshakes without a client
            certificate signed by ``client_ca`` (mTLS).
        :param client_ca: PEM roots for client certificates; defaults to this
            hub's CA when ``require_client_cert`` is set.  Given without
            ``require_client_cert``, a client certificate is requested and
            verified when presented, but not required.
        """
        roots = client_ca
        if roots is None and require_client_cert:
            roots = self.ca_pem
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=roots,
            require_client_auth=require_client_cert,
        )

    @staticmethod
    def channel_credentials(
        ca_pem: bytes, client_cert: bytes | None = None, client_key: bytes | None = None
    ) -> grpc.ChannelCredentials:
        """See :func:`channel_credentials`."""
        return channel_credentials(ca_pem, client_cert, client_key)


def channel_credentials(
    ca_pem: bytes, client_cert: bytes | None = None, client_key: bytes | None = None
) -> grpc.ChannelCredentials:
    """Credentials for ``grpc.secure_channel`` trusting ``ca_pem`` only.

    :param client_cert: PEM client certificate for mTLS (with ``client_key``).
    :param client_key: PEM private key of ``client_cert``.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=client_key, certificate_chain=client_cert
    )


# -- hosts ------------------------------------------------------------------

_San = ipaddress.IPv4Address | ipaddress.IPv6Address | str


def _parse_host(host: str) -> _San:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        raise ValueError(f"empty host name in {host!r}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    name = text.rstrip(".").lower()
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        name = name.encode("idna").decode("ascii")
    if not name or any(c.isspace() or c in "/:@" for c in name):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return name


def _requested(hosts: Sequence[str]) -> list[_San]:
    out: list[_San] = []
    for host in (*LOCAL_HOSTS, *hosts):
        san = _parse_host(host)
        if san not in out:
            out.append(san)
    return out


def _cert_sans(cert: x509.Certificate) -> list[_San]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    sans: list[_San] = [name.lower() for name in ext.get_values_for_type(x509.DNSName)]
    sans.extend(ext.get_values_for_type(x509.IPAddress))
    return sans


def _general_name(san: _San) -> x509.GeneralName:
    if isinstance(san, str):
        return x509.DNSName(san)
    return x509.IPAddress(san)


# -- files ------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed or the file be odd
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ensure_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
        os.chmod(data_dir, 0o700)
    elif not data_dir.is_dir():
        raise TLSSetupError(f"{data_dir} is not a directory")


def _check_private(path: Path) -> None:
    """Tighten a key file that others can read (e.g. restored from a backup)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); setting 0600", path, mode)
        os.chmod(path, 0o600)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Serialize concurrent first starts (hub + CLI) on one data directory."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- certificates -------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    # A random suffix tells the CAs of different data directories apart.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sesame"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sesame hub CA {secrets.token_hex(4)}"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    sans: Sequence[_San],
    eku: x509.ObjectIdentifier,
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def _load_ca(data_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA on disk, or None when neither file exists."""
    cert_path, key_path = data_dir / CA_CERT_FILE, data_dir / CA_KEY_FILE
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if not have_cert and not have_key:
        return None
    if not (have_cert and have_key):
        missing = key_path if have_cert else cert_path
        raise TLSSetupError(
            f"{missing} is missing; the CA in {data_dir} is incomplete. Restore it, or remove "
            f"{CA_CERT_FILE} and {CA_KEY_FILE} to create a new CA (every copy of the old "
            f"{CA_CERT_FILE} then stops working)"
        )
    _check_private(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise TLSSetupError(f"cannot load the CA in {data_dir}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise TLSSetupError(f"{key_path} does not belong to {cert_path}")
    if cert.not_valid_after_utc <= _now():
        raise TLSSetupError(
            f"the CA certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            f"remove {CA_CERT_FILE} and {CA_KEY_FILE} to create a new CA"
        )
    return cert, key


def _usable_hub_cert(
    data_dir: Path, ca_cert: x509.Certificate
) -> tuple[x509.Certificate, bytes, bytes] | None:
    """The hub certificate on disk if it is signed by ``ca_cert``, matches its key
    and is not about to expire; otherwise None (it will be reissued)."""
    cert_path, key_path = data_dir / HUB_CERT_FILE, data_dir / HUB_KEY_FILE
    if not (cert_path.exists() and key_path.exists()):
        return None
    _check_private(key_path)
    cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        log.info("reissuing %s: %s", cert_path, type(e).__name__)
        return None
    if key.public_key() != cert.public_key():
        log.info("reissuing %s: it does not match %s", cert_path, key_path)
        return None
    if cert.not_valid_after_utc - RENEW_BEFORE <= _now():
        log.info("reissuing %s: it expires on %s", cert_path, cert.not_valid_after_utc)
        return None
    return cert, cert_pem, key_pem


def ensure_hub_tls(data_dir: Path, hosts: Sequence[str]) -> HubTLS:
    """Create or reuse the hub's CA and certificate in ``data_dir``.

    :param hosts: names and IP addresses clients use to reach the hub (e.g. the
        listen interface, the machine's DNS name).  IPv6 literals may be
        bracketed.  ``localhost``, ``127.0.0.1`` and ``::1`` are always added.
        Do not rely on a wildcard listen address (``0.0.0.0``) here: pass the
        names clients will actually dial.
    :raises ValueError: a host is not a name or an IP address.
    :raises TLSSetupError: the CA files are incomplete, mismatched or expired.
        Nothing is overwritten in that case.
    """
    data_dir = Path(data_dir)
    wanted = _requested(hosts)
    _ensure_dir(data_dir)
    with _locked(data_dir):
        created = False
        loaded = _load_ca(data_dir)
        if loaded is None:
            ca_cert, ca_key = _make_ca()
            # Key first: a crash in between leaves a CA that _load_ca reports, not one
            # silently replaced.
            _write_file(data_dir / CA_KEY_FILE, _private_bytes(ca_key), 0o600)
            _write_file(
                data_dir / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644
            )
            created = True
            log.info("created a private CA: %s", data_dir / CA_CERT_FILE)
        else:
            ca_cert, ca_key = loaded
        ca_pem = (data_dir / CA_CERT_FILE).read_bytes()

        current = None if created else _usable_hub_cert(data_dir, ca_cert)
        reissued = False
        if current is not None and all(s in _cert_sans(current[0]) for s in wanted):
            cert, cert_pem, key_pem = current
        else:
            sans = list(wanted)
            if current is not None:  # keep what the old certificate covered
                sans += [s for s in _cert_sans(current[0]) if s not in sans]
            first_name = next((s for s in sans if isinstance(s, str)), "localhost")
            cert, key = _make_leaf(
                ca_cert, ca_key, first_name, sans, ExtendedKeyUsageOID.SERVER_AUTH
            )
            cert_pem, key_pem = cert.public_bytes(serialization.Encoding.PEM), _private_bytes(key)
            _write_file(data_dir / HUB_KEY_FILE, key_pem, 0o600)
            _write_file(data_dir / HUB_CERT_FILE, cert_pem, 0o644)
            reissued = True
            log.info(
                "issued hub certificate %s for %s",
                data_dir / HUB_CERT_FILE,
                ", ".join(str(s) for s in sans),
            )
    return HubTLS(
        data_dir=data_dir,
        ca_path=data_dir / CA_CERT_FILE,
        ca_key_path=data_dir / CA_KEY_FILE,
        cert_path=data_dir / HUB_CERT_FILE,
        key_path=data_dir / HUB_KEY_FILE,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        hosts=tuple(str(s) for s in _cert_sans(cert)),
        created=created,
        reissued=reissued,
    )


def cluster_ca_bundle() -> bytes:
    """A new CA for a cluster: its certificate then its key, PEM (what the store keeps)."""
    cert, key = _make_ca()
    return cert.public_bytes(serialization.Encoding.PEM) + _private_bytes(key)


def adopt_cluster_ca(data_dir: Path, bundle: bytes) -> bool:
    """Make the cluster's CA (``bundle``: certificate + key PEM, from the store) the CA of
    ``data_dir``, so :func:`ensure_hub_tls` issues this hub's certificate from it and
    ``ca.pem`` is the one file every remote and client of the cluster trusts.  A
    different CA already there is kept as ``ca.pem.pre-cluster`` (and its key) and
    logged.  True when the files changed.

    :raises TLSSetupError: the bundle is not a certificate and its key.
    """
    data_dir = Path(data_dir)
    try:
        cert = x509.load_pem_x509_certificate(bundle)
        key = serialization.load_pem_private_key(bundle, password=None)
    except (ValueError, TypeError) as e:
        raise TLSSetupError(f"the cluster CA in the store does not load: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise TLSSetupError("the cluster CA's key in the store does not belong to its certificate")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _ensure_dir(data_dir)
    with _locked(data_dir):
        cert_path, key_path = data_dir / CA_CERT_FILE, data_dir / CA_KEY_FILE
        if cert_path.exists() and cert_path.read_bytes() == cert_pem and key_path.exists():
            return False
        if cert_path.exists():
            for path in (cert_path, key_path):
                if path.exists():
                    os.replace(path, path.with_name(path.name + ".pre-cluster"))
            log.warning("%s held another CA; it is now %s.pre-cluster (the cluster's CA "
                        "replaces it: hand out the new %s)", cert_path, CA_CERT_FILE, CA_CERT_FILE)
        _write_file(key_path, _private_bytes(key), 0o600)
        _write_file(cert_path, cert_pem, 0o644)
    return True


def issue_client_cert(
    data_dir: Path, common_name: str, days: int = LEAF_DAYS
) -> tuple[bytes, bytes]:
    """Issue a client certificate (clientAuth) from the hub CA in ``data_dir``.

    Nothing is written: the caller stores the pair where the client reads it.

    :returns: ``(cert_pem, key_pem)``; the key is unencrypted PKCS#8 PEM.
    :raises TLSSetupError: there is no usable CA in ``data_dir``.
    """
    if not common_name or len(common_name) > 64:
        raise ValueError("common_name must be 1 to 64 characters")
    if days < 1:
        raise ValueError("days must be at least 1")
    data_dir = Path(data_dir)
    loaded = _load_ca(data_dir)
    if loaded is None:
        raise TLSSetupError(f"no CA in {data_dir}; start the hub once to create it")
    ca_cert, ca_key = loaded
    cert, key = _make_leaf(ca_cert, ca_key, common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH, days)
    return cert.public_bytes(serialization.Encoding.PEM), _private_bytes(key)
