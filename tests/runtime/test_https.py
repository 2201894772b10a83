"""The self-signed LAN certificate behind ``--https``: covers the addresses, is reused, is remade when they change."""

from __future__ import annotations

import pytest

pytest.importorskip("cryptography", reason="--https needs cryptography (the serve/demo extras)")

from cryptography import x509  # noqa: E402

from kimchi_edge.runtime.https import lan_certificate, qr_text  # noqa: E402


def sans(cert_path):
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def test_certificate_covers_lan_addresses_and_is_reused(tmp_path):
    cert, key, made = lan_certificate(["192.168.1.20"], folder=tmp_path)
    assert made and key.stat().st_mode & 0o077 == 0  # the key is private
    dns, ips = sans(cert)
    assert "localhost" in dns and {"127.0.0.1", "192.168.1.20"} <= ips
    before = cert.read_bytes()
    assert lan_certificate(["192.168.1.20"], folder=tmp_path)[2] is False and cert.read_bytes() == before
    cert2, _, made2 = lan_certificate(["10.0.0.7"], folder=tmp_path)  # the laptop moved to another network
    assert made2 and "10.0.0.7" in sans(cert2)[1]


def test_qr_code_is_drawn_when_segno_is_there():
    pytest.importorskip("segno", reason="the QR code needs segno")
    text = qr_text("https://192.168.1.20:8501")
    assert text.count("\n") > 10 and "█" in text
