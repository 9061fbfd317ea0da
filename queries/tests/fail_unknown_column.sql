-- fail: no_such_column
INSERT INTO t (id, x) SELECT id, no_such_column FROM public.users;
