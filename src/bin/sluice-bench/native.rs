//! The reference: PostgreSQL's own logical replication, a publication and a subscription
//! into a second database on the same server. The slot is created first and the
//! subscription uses it (`create_slot = false`), as a subscription in the same cluster must.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio_postgres::Client;

use crate::scenario::{Bench, count, has_user, insert_marker, measure_latency, percentile, pg, workload};
use crate::wait_for;

#[derive(Debug, Default, Serialize)]
pub struct NativeFigures {
    pub snapshot_rows_per_s: Option<f64>,
    pub catchup_events_per_s: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

const SUBSCRIBER: &str = "bench_native";
pub const LIMIT: Duration = Duration::from_secs(1800);

/// A subscription from `source` (tables users and orders) into a fresh subscriber with
/// the load generator's schema; returns the subscriber once the subscription exists.
async fn subscribe(bench: &Bench, source: &str, copy_data: bool) -> anyhow::Result<Client> {
    drop_leftover_subscription(bench).await;
    publish(bench, source).await?;
    let subscriber = subscriber(bench).await?;
    attach(bench, &subscriber, source, copy_data).await?;
    Ok(subscriber)
}

/// The publication of `source`'s users and orders and its slot: from here on the slot
/// keeps every change for a subscription [`attach`]ed later. After
/// [`drop_leftover_subscription`], which may hold the slot.
pub async fn publish(bench: &Bench, source: &str) -> anyhow::Result<()> {
    bench.drop_slot("bench_native").await?;
    let publisher = pg(&bench.url(source)).await?;
    publisher
        .batch_execute(
            "DROP PUBLICATION IF EXISTS bench_native; CREATE PUBLICATION bench_native FOR TABLE users, orders",
        )
        .await
        .context("publication")?;
    // Not in the publication's transaction: a slot cannot be created after writes.
    publisher
        .batch_execute("SELECT pg_create_logical_replication_slot('bench_native', 'pgoutput')")
        .await
        .context("replication slot")?;
    Ok(())
}

/// Drops the subscription a failed run left, which keeps its slot active and so both
/// databases in use.
pub async fn drop_leftover_subscription(bench: &Bench) {
    if let Ok(old) = pg(&bench.url(SUBSCRIBER)).await {
        let _ = old
            .batch_execute(
                "ALTER SUBSCRIPTION bench_native DISABLE; ALTER SUBSCRIPTION bench_native SET (slot_name = NONE)",
            )
            .await;
        let _ = old.batch_execute("DROP SUBSCRIPTION IF EXISTS bench_native").await;
    }
}

/// A fresh subscriber database with the load generator's schema.
pub async fn subscriber(bench: &Bench) -> anyhow::Result<Client> {
    bench.fresh_pg(SUBSCRIBER).await?;
    let subscriber = pg(&bench.url(SUBSCRIBER)).await?;
    loadgen::create_schema(&subscriber).await?;
    Ok(subscriber)
}

/// Subscribes `subscriber` to what [`publish`] made of `source`.
pub async fn attach(bench: &Bench, subscriber: &Client, source: &str, copy_data: bool) -> anyhow::Result<()> {
    let conninfo = connection_string(&bench.url(source))?;
    subscriber
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION bench_native CONNECTION '{conninfo}' PUBLICATION bench_native \
             WITH (create_slot = false, slot_name = 'bench_native', copy_data = {copy_data})"
        ))
        .await
        .context("create subscription")
}

/// `host=... port=... user=... dbname=...` from a postgres:// URL.
fn connection_string(url: &str) -> anyhow::Result<String> {
    let config: tokio_postgres::Config = url.parse()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(dir)) => dir.to_string_lossy().into_owned(),
        None => "127.0.0.1".into(),
    };
    let mut s = format!(
        "host={host} port={} user={} dbname={}",
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres")
    );
    if let Some(p) = config.get_password() {
        s.push_str(&format!(" password={}", String::from_utf8_lossy(p)));
    }
    Ok(s)
}

/// Every table of the subscription copied (`ready` or `synced`).
async fn synced(subscriber: &Client) -> anyhow::Result<bool> {
    let pending: i64 = subscriber
        .query_one("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's')", &[])
        .await?
        .get(0);
    let total: i64 = subscriber.query_one("SELECT count(*) FROM pg_subscription_rel", &[]).await?.get(0);
    Ok(total > 0 && pending == 0)
}

pub async fn unsubscribe(bench: &Bench, subscriber: Client, source: &str) -> anyhow::Result<()> {
    // DROP SUBSCRIPTION also drops the slot on the publisher.
    subscriber.batch_execute("DROP SUBSCRIPTION IF EXISTS bench_native").await?;
    drop(subscriber);
    pg(&bench.url(source)).await?.batch_execute("DROP PUBLICATION IF EXISTS bench_native").await?;
    bench.drop_slot("bench_native").await?;
    Ok(())
}

pub async fn measure(bench: &Bench) -> anyhow::Result<NativeFigures> {
    let mut figures = NativeFigures::default();
    if bench.args.runs("snapshot") {
        figures.snapshot_rows_per_s = Some(snapshot(bench).await?);
    }
    if bench.args.runs("catchup") || bench.args.runs("latency") {
        catchup_and_latency(bench, &mut figures).await?;
    }
    Ok(figures)
}

/// Rows/s of the initial table synchronisation of N users.
async fn snapshot(bench: &Bench) -> anyhow::Result<f64> {
    let rows = bench.args.rows;
    let started = Instant::now();
    let subscriber = subscribe(bench, "bench_src", true).await?;
    wait_for("the native initial copy", LIMIT, Duration::from_millis(100), || synced(&subscriber)).await?;
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(count(&subscriber, "users").await? == rows as i64, "the native copy is incomplete");
    eprintln!("[bench] native snapshot: {rate:.0} rows/s");
    unsubscribe(bench, subscriber, "bench_src").await?;
    Ok(rate)
}

/// Catch-up (the same workload written while the subscription is disabled), then latency
/// on the caught-up subscription.
async fn catchup_and_latency(bench: &Bench, figures: &mut NativeFigures) -> anyhow::Result<()> {
    bench.ensure_source("bench_cu", bench.args.catchup_users).await?;
    let subscriber = subscribe(bench, "bench_cu", true).await?;
    wait_for("the native copy of the catch-up source", LIMIT, Duration::from_millis(100), || synced(&subscriber))
        .await?;
    let users = count(&pg(&bench.url("bench_cu")).await?, "users").await?;
    anyhow::ensure!(
        users >= bench.args.catchup_users as i64 && count(&subscriber, "users").await? == users,
        "native copy incomplete"
    );
    let source = pg(&bench.url("bench_cu")).await?;
    if bench.args.runs("catchup") {
        subscriber.batch_execute("ALTER SUBSCRIPTION bench_native DISABLE").await?;
        eprintln!("[bench] native catch-up: writing {} changes while the subscription is disabled", bench.args.changes);
        let summary =
            loadgen::run(workload(&bench.url("bench_cu"), bench.args.changes, 0, 5, false), Default::default()).await?;
        let marker = insert_marker(&source).await?;
        let started = Instant::now();
        subscriber.batch_execute("ALTER SUBSCRIPTION bench_native ENABLE").await?;
        wait_for("the native catch-up", LIMIT, Duration::from_millis(50), || async {
            has_user(&subscriber, marker).await
        })
        .await?;
        let rate = summary.changes as f64 / started.elapsed().as_secs_f64();
        eprintln!("[bench] native catch-up: {rate:.0} events/s");
        figures.catchup_events_per_s = Some(rate);
    }
    if bench.args.runs("latency") {
        let latencies = measure_latency(
            &source,
            &subscriber,
            &bench.url("bench_cu"),
            bench.args.latency_txns,
            bench.args.latency_rate,
        )
        .await?;
        let p = |q| percentile(&latencies, q);
        (figures.latency_p50_ms, figures.latency_p99_ms) = (p(0.50), p(0.99));
        eprintln!(
            "[bench] native latency: p50 {:.2} ms, p99 {:.2} ms",
            figures.latency_p50_ms.unwrap_or(f64::NAN),
            figures.latency_p99_ms.unwrap_or(f64::NAN)
        );
    }
    unsubscribe(bench, subscriber, "bench_cu").await
}
