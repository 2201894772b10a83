"""HTTPS for phones in one flag: a self-signed certificate for this machine's LAN addresses, kept for reuse.

Phones open the camera only over HTTPS (or on localhost).  ``kimchi-edge demo --https`` / ``serve --https`` call
:func:`lan_certificate`: it makes (once) an ECDSA P-256 certificate whose subjectAltName lists ``localhost``,
this host's name and every LAN IPv4 address found, with ``cryptography`` (PyCA), and keeps it outside the
repository in ``$XDG_CONFIG_HOME/kimchi-edge/https/`` (``~/.config/kimchi-edge/https``).  It is reused while it
is valid and still covers the current addresses; otherwise it is remade.  :func:`print_phone_address` prints the
``https://<LAN-IP>:PORT`` address and a QR code of it in the terminal (``segno``; plain text without it).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
import sys
from pathlib import Path

CERT_NAME, KEY_NAME = "kimchi-edge-lan.pem", "kimchi-edge-lan.key"
VALID_DAYS = 365


def cert_dir() -> Path:
    """Where the certificate lives: ``$KIMCHI_EDGE_HTTPS_DIR``, else ``$XDG_CONFIG_HOME/kimchi-edge/https``."""
    env = os.environ.get("KIMCHI_EDGE_HTTPS_DIR")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "kimchi-edge" / "https"


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses a phone on the same network can reach (no loopback), best first."""
    found: list[str] = []
    try:  # the address of the interface that routes outward (no packet is sent for UDP connect)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            found.append(s.getsockname()[0])
    except OSError:
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.append(info[4][0])
    except OSError:
        pass
    out = []
    for a in found:
        ip = ipaddress.ip_address(a)
        if not ip.is_loopback and not ip.is_unspecified and a not in out:
            out.append(a)
    return out


def _names_in(cert) -> tuple[set[str], set[str]]:
    from cryptography import x509

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def lan_certificate(addresses: list[str] | None = None, *, folder: Path | None = None) -> tuple[Path, Path, bool]:
    """A certificate + key covering ``localhost``, this host name and ``addresses`` (default: :func:`lan_addresses`).

    Returns:
        ``(cert_path, key_path, made)``; ``made`` is False when a still-valid certificate covering them was reused.

    Raises:
        MissingDependencyError: ``cryptography`` is not installed.
    """
    from .errors import require

    require("cryptography", extra="serve", purpose="--https (a self-signed certificate)")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = folder or cert_dir()
    addresses = lan_addresses() if addresses is None else addresses
    host = socket.gethostname()
    want_dns, want_ip = {"localhost", host}, {"127.0.0.1", *addresses}
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    now = _dt.datetime.now(_dt.timezone.utc)
    if cert_path.is_file() and key_path.is_file():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            dns, ips = _names_in(cert)
            if cert.not_valid_after_utc > now + _dt.timedelta(days=1) and want_dns <= dns and want_ip <= ips:
                return cert_path, key_path, False
        except (ValueError, x509.ExtensionNotFound):
            pass  # unreadable or foreign: make a new one
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kimchi-edge on {host}")])
    san = [x509.DNSName(d) for d in sorted(want_dns)] + [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(want_ip)]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    from .fsutil import atomic_write_bytes

    atomic_write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, True


def fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint of the certificate, as a phone's "certificate details" page shows it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    fp = x509.load_pem_x509_certificate(cert_path.read_bytes()).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in fp)


def qr_text(url: str) -> str:
    """The URL as a QR code drawn with terminal characters ('' when ``segno`` is not installed)."""
    try:
        import segno
    except ImportError:
        return ""
    import io

    buf = io.StringIO()
    segno.make(url, error="m").terminal(out=buf, compact=True)
    return buf.getvalue()


def print_phone_address(port: int, cert_path: Path, made: bool, *, path: str = "", file=None) -> str:
    """Print where a phone opens it (``https://<LAN-IP>:PORT``), a QR code of it and the certificate's fingerprint."""
    file = file or sys.stdout
    addrs = lan_addresses()
    url = f"https://{addrs[0] if addrs else 'localhost'}:{port}{path}"
    print(f"on your phone (same Wi-Fi): {url}", file=file)
    qr = qr_text(url)
    if qr:
        print(qr, file=file, end="")
    print(f"certificate: {cert_path} ({'made now' if made else 'reused'}; self-signed: the phone asks once to trust it, "
          f"SHA-256 {fingerprint(cert_path)[:23]}…)", file=file, flush=True)
    return url
