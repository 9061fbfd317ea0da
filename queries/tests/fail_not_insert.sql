-- fail: only INSERT INTO target
UPDATE public.users SET name = 'x';
