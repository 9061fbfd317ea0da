-- fail: subqueries are not allowed
INSERT INTO t (id) SELECT id FROM public.users WHERE id IN (SELECT user_id FROM public.orders);
