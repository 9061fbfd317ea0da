-- ok
INSERT INTO users_report (id, email_domain, born_year, is_active, short_bio)
SELECT id, split_part(email, '@', 2), date_part('year', birthdate), active, left(bio, 40)
FROM public.users WHERE balance > 10 AND email LIKE '%@%';
