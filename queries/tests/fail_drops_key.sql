-- fail: drops primary-key column id
INSERT INTO names (name) SELECT name FROM public.users;
