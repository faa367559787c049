-- Encryption at rest (storage/crypto.py): a collection account's restricted fields (SSN, date of birth,
-- card reference) as one AES-256-GCM ciphertext of their JSON, with the id of the key that sealed it.
ALTER TABLE collection_accounts
    ADD COLUMN restricted bytea CHECK (restricted IS NULL OR octet_length(restricted) BETWEEN 29 AND 4096),
    ADD COLUMN restricted_key_id text CHECK (restricted_key_id IS NULL OR restricted_key_id ~ '^[A-Za-z0-9._-]{1,32}$');
CREATE INDEX collection_accounts_restricted_key ON collection_accounts (restricted_key_id)
    WHERE restricted IS NOT NULL;
