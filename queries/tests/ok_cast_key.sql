-- ok
-- The key may be renamed and cast: the target key is the image of the source key.
INSERT INTO user_keys (user_key, name_upper, balance_cents)
SELECT CAST(id AS TEXT), upper(name), CAST(balance * 100 AS BIGINT) FROM public.users;
