-- Each business day the chain head is signed with the gateway's Ed25519 key, so a rewrite of
-- the whole chain after that point is detectable with the public key alone.
CREATE TABLE voucher_checkpoints (
    day         date        PRIMARY KEY,
    seq         bigint      NOT NULL,
    hash        text        NOT NULL,
    public_key  text        NOT NULL,   -- base64 raw Ed25519 public key that signed it
    signature   text        NOT NULL,   -- base64 signature of {"day","hash","seq"} canonical
    created_at  timestamptz NOT NULL DEFAULT now()
);
