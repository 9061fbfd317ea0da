-- fail: cannot be written to a sink
INSERT INTO t (id, d) SELECT id, arrow_cast(id, 'Duration(Second)') FROM public.users;
