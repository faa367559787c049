-- The collection account a placed call was made for (POST /api/voice/call {account_id}), so an
-- account's page can list its calls.  Accounts are soft-deleted (0005); a hard delete (the lifecycle's
-- purge) leaves the call and forgets the link.
ALTER TABLE calls ADD COLUMN account_id uuid REFERENCES collection_accounts (id) ON DELETE SET NULL;
CREATE INDEX calls_account ON calls (account_id, created_at DESC) WHERE account_id IS NOT NULL;
