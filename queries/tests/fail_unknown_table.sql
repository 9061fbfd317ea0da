-- fail: no_such_table
INSERT INTO t (id) SELECT id FROM public.no_such_table;
