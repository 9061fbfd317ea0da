-- fail: already mapped at line 2
INSERT INTO t (id) SELECT id FROM public.users;
INSERT INTO t (id) SELECT id FROM public.orders;
