-- fail: aggregates are not allowed
INSERT INTO totals (user_id, total)
SELECT user_id, sum(amount) FROM public.orders GROUP BY user_id;
