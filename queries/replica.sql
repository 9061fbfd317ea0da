-- users -> users_email: renamed, lowercased, filtered. An update that clears the email
-- deletes the row from users_email; one that sets it inserts it.
INSERT INTO users_email (user_id, full_name, email)
SELECT id, name, lower(email) FROM public.users WHERE email IS NOT NULL;

-- orders as they are, with the amount in cents.
INSERT INTO orders (id, user_id, amount_cents, status, created_at)
SELECT id, user_id, CAST(amount * 100 AS BIGINT), status, created_at FROM public.orders;
