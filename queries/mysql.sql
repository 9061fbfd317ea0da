-- The mapping of the end-to-end tests: renames, lowercases and filters users.
INSERT INTO customers (customer_id, full_name, email, balance, attributes, active, updated_at)
SELECT id, name, lower(email), balance, attributes, active, updated_at FROM public.users WHERE active;

INSERT INTO orders (id, user_id, amount, status, tags, updated_at)
SELECT id, user_id, amount, status, tags, updated_at FROM public.orders;
