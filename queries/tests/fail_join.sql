-- fail: joins are not allowed
INSERT INTO t (id, name)
SELECT o.id, u.name FROM public.orders o JOIN public.users u ON u.id = o.user_id;
