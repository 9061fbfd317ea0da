-- fail: aggregates are not allowed
INSERT INTO totals (id, n) SELECT max(id), count(*) FROM public.users;
