-- The outcome of every full recomputation of the voucher chain (the daily one in the gateway
-- and `fundgate audit verify`), so every process can export when it last held.
CREATE TABLE voucher_verifications (
    id            bigserial   PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    intact        boolean     NOT NULL,
    checked       bigint      NOT NULL,
    first_broken  bigint,
    problem       text
);
