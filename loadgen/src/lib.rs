//! A Faker-style load generator for sluice's source tables.
//!
//! It creates `users` (realistic columns, a `bio` that is sometimes over 8 KB so PostgreSQL
//! TOASTs it, numeric balance, jsonb attributes, uuid) and `orders` (referencing users),
//! then writes a mix of inserts, updates and deletes at a fixed rate over several
//! connections, in transactions of a chosen size. Every written row carries
//! `updated_at = clock_timestamp()`, its commit-side time, so a sink can measure
//! commit-to-visible latency.
//!
//! Bounds: it never writes more than `--count` changes nor runs past `--duration`; each
//! connection draws its changes from one shared budget. Values are deterministic per
//! connection for a given `--seed`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fake::Fake;
use fake::faker::address::en::{CityName, StreetName, ZipCode};
use fake::faker::company::en::CompanyName;
use fake::faker::internet::en::FreeEmail;
use fake::faker::lorem::en::{Paragraph, Word};
use fake::faker::name::en::Name;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::{Client, NoTls};

/// The schema loadgen writes to.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS users (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    company text,
    address text,
    birthdate date,
    bio text,
    balance numeric(12,2) NOT NULL DEFAULT 0,
    attributes jsonb,
    external_id uuid NOT NULL,
    active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    amount numeric(12,2) NOT NULL,
    status text NOT NULL,
    items jsonb,
    tags text[],
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS orders_user_id ON orders (user_id);
";

/// One kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Insert,
    Update,
    Delete,
}

/// Proportions of inserts, updates and deletes (`insert=70,update=20,delete=10`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub insert: u32,
    pub update: u32,
    pub delete: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self { insert: 70, update: 20, delete: 10 }
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mix = Mix { insert: 0, update: 0, delete: 0 };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected kind=weight"))?;
            let v: u32 = v.trim().parse().map_err(|_| format!("{part:?}: weight is not a number"))?;
            match k.trim() {
                "insert" => mix.insert = v,
                "update" => mix.update = v,
                "delete" => mix.delete = v,
                other => return Err(format!("{other:?}: kinds are insert, update, delete")),
            }
        }
        if mix.insert + mix.update + mix.delete == 0 {
            return Err("the mix needs a positive weight".into());
        }
        Ok(mix)
    }
}

impl Mix {
    fn pick(&self, rng: &mut StdRng) -> Kind {
        let total = self.insert + self.update + self.delete;
        let r = rng.random_range(0..total);
        if r < self.insert {
            Kind::Insert
        } else if r < self.insert + self.update {
            Kind::Update
        } else {
            Kind::Delete
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Users,
    Orders,
}

impl std::str::FromStr for Table {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "users" => Ok(Table::Users),
            "orders" => Ok(Table::Orders),
            other => Err(format!("unknown table {other:?} (users, orders)")),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    /// Changes per second over all connections; 0 = as fast as possible.
    pub rate: u64,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub mix: Mix,
    pub tables: Vec<Table>,
    pub seed: u64,
    pub connections: usize,
    /// Changes per transaction.
    pub txn_size: usize,
    /// Print a progress line every second.
    pub progress: bool,
}

/// What was done.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub changes: u64,
    pub by_kind: BTreeMap<(Table, Kind), u64>,
    pub transactions: u64,
    /// Transactions rolled back by a deadlock or a serialization failure and written again.
    pub retries: u64,
    pub elapsed: Duration,
    /// Latency of each transaction (commit included), sorted.
    pub latencies: Vec<Duration>,
}

impl Summary {
    pub fn rate(&self) -> f64 {
        self.changes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }

    pub fn kind(&self, k: Kind) -> u64 {
        self.by_kind.iter().filter(|((_, kind), _)| *kind == k).map(|(_, n)| n).sum()
    }
}

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.with_context(|| format!("connect to {}", mask(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The URL with its password hidden.
pub fn mask(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| rest.split_once('@').map(|(cred, host)| (scheme, cred, host)))
    {
        Some((scheme, cred, host)) => match cred.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Creates the tables if missing.
pub async fn create_schema(client: &Client) -> anyhow::Result<()> {
    client.batch_execute(SCHEMA_SQL).await.context("create the loadgen schema")
}

/// One fake user, as values for an INSERT.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRow {
    pub name: String,
    pub email: String,
    pub company: String,
    pub address: String,
    pub birthdate: chrono::NaiveDate,
    pub bio: String,
    pub balance: String,
    pub attributes: String,
    pub external_id: uuid::Uuid,
}

/// Share of bios long enough to be TOASTed (over 8 KB).
pub const LONG_BIO_PERCENT: u32 = 5;

pub fn fake_user(rng: &mut StdRng) -> UserRow {
    let name: String = Name().fake_with_rng(rng);
    let email: String = FreeEmail().fake_with_rng(rng);
    let bio = if rng.random_range(0..100) < LONG_BIO_PERCENT {
        let mut b = String::new();
        while b.len() < 9000 {
            b.push_str(&Paragraph(5..10).fake_with_rng::<String, _>(rng));
            b.push(' ');
        }
        b
    } else {
        Paragraph(1..3).fake_with_rng(rng)
    };
    let tier: String = Word().fake_with_rng(rng);
    let attributes = serde_json::json!({
        "tier": tier,
        "score": rng.random_range(0..1000),
        "newsletter": rng.random_bool(0.5),
        "tags": [Word().fake_with_rng::<String, _>(rng), Word().fake_with_rng::<String, _>(rng)],
    })
    .to_string();
    let days = rng.random_range(0..20_000);
    UserRow {
        name,
        email,
        company: CompanyName().fake_with_rng(rng),
        address: format!(
            "{} {}, {} {}",
            rng.random_range(1..999),
            StreetName().fake_with_rng::<String, _>(rng),
            ZipCode().fake_with_rng::<String, _>(rng),
            CityName().fake_with_rng::<String, _>(rng)
        ),
        birthdate: chrono::NaiveDate::from_ymd_opt(1950, 1, 1).expect("valid date") + chrono::Duration::days(days),
        bio,
        balance: format!("{}.{:02}", rng.random_range(0..100_000), rng.random_range(0..100)),
        attributes,
        external_id: uuid::Uuid::from_u128(rng.random()),
    }
}

/// Ids known to exist, shared by the connections.
#[derive(Default)]
struct Live {
    users: Vec<i64>,
    orders: Vec<i64>,
}

impl Live {
    fn pick(v: &[i64], rng: &mut StdRng) -> Option<i64> {
        (!v.is_empty()).then(|| v[rng.random_range(0..v.len())])
    }

    fn take(v: &mut Vec<i64>, rng: &mut StdRng) -> Option<i64> {
        (!v.is_empty()).then(|| v.swap_remove(rng.random_range(0..v.len())))
    }
}

/// Tops `users` up to `n` rows as fast as possible (multi-row INSERTs), for snapshots and
/// catch-up; returns how many were inserted and how long it took.
pub async fn populate(url: &str, n: u64, seed: u64) -> anyhow::Result<(u64, Duration)> {
    let client = connect(url).await?;
    create_schema(&client).await?;
    let existing: i64 = client.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
    let n = n.saturating_sub(existing as u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let batch = (n - done).min(1000);
        let mut sql = String::from(
            "INSERT INTO users (name, email, company, address, birthdate, bio, balance, attributes, external_id) VALUES ",
        );
        for i in 0..batch {
            let u = fake_user(&mut rng);
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "({},{},{},{},'{}',{},{},{},'{}')",
                lit(&u.name),
                lit(&u.email),
                lit(&u.company),
                lit(&u.address),
                u.birthdate,
                lit(&u.bio),
                u.balance,
                lit(&u.attributes),
                u.external_id
            ));
        }
        client.batch_execute(&sql).await.context("insert users")?;
        done += batch;
    }
    Ok((n, start.elapsed()))
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Runs the workload until the count, the duration or `stop`.
pub async fn run(options: Options, stop: Arc<AtomicBool>) -> anyhow::Result<Summary> {
    let setup = connect(&options.url).await?;
    create_schema(&setup).await?;
    let users: Vec<i64> = setup.query("SELECT id FROM users", &[]).await?.iter().map(|r| r.get(0)).collect();
    let orders: Vec<i64> = setup.query("SELECT id FROM orders", &[]).await?.iter().map(|r| r.get(0)).collect();
    let live = Arc::new(Mutex::new(Live { users, orders }));
    let budget = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = options.duration.map(|d| start + d);
    let mut tasks = Vec::new();
    for c in 0..options.connections.max(1) {
        let (options, live, budget, written, stop) =
            (options.clone(), live.clone(), budget.clone(), written.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { worker(c, options, live, budget, written, stop, start, deadline).await }));
    }
    let progress = {
        let (written, stop, enabled) = (written.clone(), stop.clone(), options.progress);
        tokio::spawn(async move {
            let mut last = 0;
            while enabled && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = written.load(Ordering::Relaxed);
                eprintln!("loadgen: {now} changes, {}/s", now - last);
                last = now;
            }
        })
    };
    let mut summary = Summary::default();
    let mut first_error = None;
    for t in tasks {
        match t.await.context("loadgen worker")? {
            Ok(s) => {
                summary.changes += s.changes;
                summary.transactions += s.transactions;
                summary.retries += s.retries;
                for (k, v) in s.by_kind {
                    *summary.by_kind.entry(k).or_default() += v;
                }
                summary.latencies.extend(s.latencies);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    summary.elapsed = start.elapsed();
    summary.latencies.sort();
    match first_error {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    index: usize,
    options: Options,
    live: Arc<Mutex<Live>>,
    budget: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    start: Instant,
    deadline: Option<Instant>,
) -> anyhow::Result<Summary> {
    let mut client = connect(&options.url).await?;
    let mut rng = StdRng::seed_from_u64(options.seed.wrapping_add(index as u64 * 7919));
    let mut summary = Summary::default();
    let txn_size = options.txn_size.max(1) as u64;
    loop {
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        // Take changes from the shared budget; never more than --count in all.
        let first = budget.fetch_add(txn_size, Ordering::SeqCst);
        let n = match options.count {
            Some(count) if first >= count => break,
            Some(count) => txn_size.min(count - first),
            None => txn_size,
        };
        // Pace: the change numbered `first` is due at first / rate seconds.
        if options.rate > 0 {
            let due = start + Duration::from_secs_f64(first as f64 / options.rate as f64);
            if let Some(d) = deadline
                && due >= d
            {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let began = Instant::now();
        // Concurrent transactions touching the same rows in another order can deadlock:
        // PostgreSQL rolls one back, and it is written again (with new random changes).
        let mut attempts = 0;
        let done = loop {
            match transaction(&mut client, n, &options, &live, &mut rng).await {
                Ok(done) => break done,
                Err(e) if attempts < MAX_RETRIES && retryable(&e) => {
                    attempts += 1;
                    summary.retries += 1;
                }
                Err(e) => return Err(e),
            }
        };
        summary.latencies.push(began.elapsed());
        summary.transactions += 1;
        for k in done {
            summary.changes += 1;
            *summary.by_kind.entry(k).or_default() += 1;
        }
        written.fetch_add(n, Ordering::Relaxed);
    }
    Ok(summary)
}

/// How often one transaction is written again after a conflict with another connection.
const MAX_RETRIES: u32 = 20;

/// A deadlock, a serialization failure, or an order whose user another connection deleted
/// meanwhile: the transaction may simply run again.
fn retryable(e: &anyhow::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.chain().filter_map(|c| c.downcast_ref::<tokio_postgres::Error>()).any(|e| {
        e.code().is_some_and(|c| {
            [SqlState::T_R_DEADLOCK_DETECTED, SqlState::T_R_SERIALIZATION_FAILURE, SqlState::FOREIGN_KEY_VIOLATION]
                .contains(c)
        })
    })
}

/// One transaction of `n` random changes; returns the changes it made.
async fn transaction(
    client: &mut Client,
    n: u64,
    options: &Options,
    live: &Mutex<Live>,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<(Table, Kind)>> {
    let txn = client.transaction().await.context("begin")?;
    let mut done = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let table = options.tables[rng.random_range(0..options.tables.len())];
        let kind = options.mix.pick(rng);
        if change(&txn, table, kind, live, rng).await? {
            done.push((table, kind));
        }
    }
    txn.commit().await.context("commit")?;
    Ok(done)
}

/// One change; `false` when there was nothing to update or delete.
async fn change(
    txn: &tokio_postgres::Transaction<'_>,
    table: Table,
    kind: Kind,
    live: &Mutex<Live>,
    rng: &mut StdRng,
) -> anyhow::Result<bool> {
    // With no user left, any change to users becomes an insert.
    let kind =
        if table == Table::Users && live.lock().expect("live ids").users.is_empty() { Kind::Insert } else { kind };
    match (table, kind) {
        (Table::Users, Kind::Insert) => {
            let u = fake_user(rng);
            let row = txn
                .query_one(
                    "INSERT INTO users (name, email, company, address, birthdate, bio, balance, attributes, external_id) \
                     VALUES ($1, $2, $3, $4, $5::text::date, $6, $7::text::numeric, $8::text::jsonb, $9::text::uuid) RETURNING id",
                    &[&u.name, &u.email, &u.company, &u.address, &u.birthdate.to_string(), &u.bio, &u.balance, &u.attributes, &u.external_id.to_string()],
                )
                .await
                .context("insert user")?;
            live.lock().expect("live ids").users.push(row.get(0));
        }
        (Table::Users, Kind::Update) => {
            let Some(id) = Live::pick(&live.lock().expect("live ids").users, rng) else { return Ok(false) };
            let balance = format!("{}.{:02}", rng.random_range(0..100_000), rng.random_range(0..100));
            // Most updates leave the bio alone: a TOASTed bio is then not resent.
            if rng.random_bool(0.8) {
                txn.execute(
                    "UPDATE users SET balance = $2::text::numeric, active = NOT active, updated_at = clock_timestamp() WHERE id = $1",
                    &[&id, &balance],
                )
                .await
                .context("update user")?;
            } else {
                let email: String = FreeEmail().fake_with_rng(rng);
                txn.execute(
                    "UPDATE users SET email = $2, balance = $3::text::numeric, \
                     attributes = jsonb_set(coalesce(attributes, '{}'), '{score}', to_jsonb($4::int)), updated_at = clock_timestamp() \
                     WHERE id = $1",
                    &[&id, &email, &balance, &rng.random_range(0..1000i32)],
                )
                .await
                .context("update user")?;
            }
        }
        (Table::Users, Kind::Delete) => {
            let Some(id) = Live::take(&mut live.lock().expect("live ids").users, rng) else { return Ok(false) };
            txn.execute("DELETE FROM users WHERE id = $1", &[&id]).await.context("delete user")?;
        }
        (Table::Orders, Kind::Insert) => {
            let Some(user) = Live::pick(&live.lock().expect("live ids").users, rng) else { return Ok(false) };
            let amount = format!("{}.{:02}", rng.random_range(1..5_000), rng.random_range(0..100));
            let status = ["new", "paid", "shipped"][rng.random_range(0..3)];
            let items =
                serde_json::json!([{ "sku": Word().fake_with_rng::<String, _>(rng), "qty": rng.random_range(1..5) }])
                    .to_string();
            let tags = vec![Word().fake_with_rng::<String, _>(rng)];
            let row = txn
                .query_opt(
                    "INSERT INTO orders (user_id, amount, status, items, tags) \
                     SELECT $1, $2::text::numeric, $3, $4::text::jsonb, $5 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1) RETURNING id",
                    &[&user, &amount, &status, &items, &tags],
                )
                .await
                .context("insert order")?;
            match row {
                Some(r) => live.lock().expect("live ids").orders.push(r.get(0)),
                None => return Ok(false),
            }
        }
        (Table::Orders, Kind::Update) => {
            let Some(id) = Live::pick(&live.lock().expect("live ids").orders, rng) else { return Ok(false) };
            let status = ["paid", "shipped", "returned"][rng.random_range(0..3)];
            let n = txn
                .execute("UPDATE orders SET status = $2, updated_at = clock_timestamp() WHERE id = $1", &[&id, &status])
                .await
                .context("update order")?;
            return Ok(n > 0);
        }
        (Table::Orders, Kind::Delete) => {
            let Some(id) = Live::take(&mut live.lock().expect("live ids").orders, rng) else { return Ok(false) };
            let n = txn.execute("DELETE FROM orders WHERE id = $1", &[&id]).await.context("delete order")?;
            return Ok(n > 0);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_pick_in_proportion() {
        let mix: Mix = "insert=60, update=30,delete=10".parse().unwrap();
        assert_eq!(mix, Mix { insert: 60, update: 30, delete: 10 });
        assert!("insert=x".parse::<Mix>().is_err());
        assert!("insert=0".parse::<Mix>().is_err());
        assert!("upsert=1".parse::<Mix>().is_err());
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = BTreeMap::new();
        for _ in 0..10_000 {
            *counts.entry(mix.pick(&mut rng)).or_insert(0) += 1;
        }
        assert!((5_700..6_300).contains(&counts[&Kind::Insert]), "{counts:?}");
        assert!((2_700..3_300).contains(&counts[&Kind::Update]), "{counts:?}");
    }

    #[test]
    fn users_are_deterministic_per_seed_and_some_bios_are_toasted() {
        let a: Vec<UserRow> = (0..50)
            .map({
                let mut r = StdRng::seed_from_u64(7);
                move |_| fake_user(&mut r)
            })
            .collect();
        let b: Vec<UserRow> = (0..50)
            .map({
                let mut r = StdRng::seed_from_u64(7);
                move |_| fake_user(&mut r)
            })
            .collect();
        assert_eq!(a, b);
        let mut r = StdRng::seed_from_u64(3);
        let long = (0..1000).filter(|_| fake_user(&mut r).bio.len() > 8192).count();
        assert!((20..100).contains(&long), "{long} long bios");
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask("postgres://u:pw@h/db"), "postgres://u:****@h/db");
        assert_eq!(mask("postgres://u@h/db"), "postgres://u@h/db");
    }
}
