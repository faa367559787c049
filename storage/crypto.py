"""Encryption at rest for the restricted class (a debtor's SSN, date of birth, card reference):
AES-256-GCM in the application, so the database alone (a dump, a replica, a stolen disk) never shows
them.

A keyring of named 256-bit keys (``SWITCHBOARD_ENCRYPTION_KEYS``: JSON ``{"<key id>": "<base64>"}``) with
one active id (``SWITCHBOARD_ENCRYPTION_KEY_ID``; default the last listed).  A value is stored as
``(key id, nonce || ciphertext)``; the associated data binds it to its table, organisation and row, so a
ciphertext copied to another row or tenant does not decrypt.  Rotation: add a key, make it active,
run ``switchboard rotate-keys`` (re-encrypts every value under an older id, in batches), then retire the
old key.  Unset (``make run``): one random key kept in ``<data_dir>/encryption-keys.json`` (mode 0600),
logged as a warning: production gives its keys from a secret store.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("switchboard.crypto")

NONCE = 12
KEY_ID = r"^[A-Za-z0-9._-]{1,32}$"


class DecryptError(Exception):
    """A value that does not decrypt: an unknown key id, another row's ciphertext, or tampering."""


def aad(table: str, org_id: object, row_id: object) -> bytes:
    return f"{table}|{org_id}|{row_id}".encode()


class Keyring:
    def __init__(self, keys: dict[str, bytes], active: str) -> None:
        if not keys or active not in keys:
            raise ValueError("the active key id must be one of the keys")
        for kid, key in keys.items():
            if len(key) != 32:
                raise ValueError(f"key {kid!r} must be 32 bytes (AES-256)")
        self._keys = dict(keys)
        self.active = active

    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    @classmethod
    def parse(cls, keys_json: str, active: str | None) -> Keyring:
        try:
            raw = orjson.loads(keys_json)
            keys = {str(k): base64.b64decode(v, validate=True) for k, v in raw.items()}
        except (orjson.JSONDecodeError, AttributeError, binascii.Error, TypeError) as exc:
            raise ValueError(f"SWITCHBOARD_ENCRYPTION_KEYS is not a JSON object of base64 keys ({exc})") from None
        return cls(keys, active or list(keys)[-1])

    @classmethod
    def local(cls, path: Path) -> Keyring:
        """The embedded default: one random key in ``path`` (created once, mode 0600)."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps({"local-1": base64.b64encode(secrets.token_bytes(32)).decode()}))
            log.warning("config.local_encryption_key", extra={"path": str(path), "hint": "set "
                        "SWITCHBOARD_ENCRYPTION_KEYS from a secret store in production"})
        return cls.parse(path.read_text(), None)

    def encrypt(self, plaintext: bytes, associated: bytes) -> tuple[str, bytes]:
        nonce = secrets.token_bytes(NONCE)
        return self.active, nonce + AESGCM(self._keys[self.active]).encrypt(nonce, plaintext, associated)

    def decrypt(self, key_id: str, blob: bytes, associated: bytes) -> bytes:
        key = self._keys.get(key_id)
        if key is None:
            raise DecryptError(f"unknown key id {key_id!r}")
        try:
            return AESGCM(key).decrypt(blob[:NONCE], blob[NONCE:], associated)
        except (InvalidTag, ValueError):
            raise DecryptError("the value does not decrypt (another row's, or changed)") from None
