-- fail: window functions are not allowed
INSERT INTO ranked (id, r) SELECT id, rank() OVER (ORDER BY balance) FROM public.users;
