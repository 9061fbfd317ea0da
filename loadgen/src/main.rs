//! `loadgen`: writes a Faker-style insert/update/delete mix into `users` and `orders`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use loadgen::{Mix, Options, Table};

#[derive(Parser)]
#[command(name = "loadgen", about = "Faker-style load generator for sluice's source tables")]
struct Cli {
    /// PostgreSQL URL of the source database.
    #[arg(long)]
    url: String,
    /// Changes per second over all connections (0: as fast as possible).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds to run.
    #[arg(long, conflicts_with = "count")]
    duration: Option<u64>,
    /// Changes to write.
    #[arg(long)]
    count: Option<u64>,
    /// Proportions of inserts, updates and deletes.
    #[arg(long, default_value = "insert=70,update=20,delete=10")]
    mix: Mix,
    /// Tables to write to.
    #[arg(long, value_delimiter = ',', default_value = "users,orders")]
    tables: Vec<Table>,
    /// Seed of the value generator (deterministic per connection).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Connections writing in parallel.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Changes per transaction.
    #[arg(long, default_value_t = 1)]
    txn_size: usize,
    /// First top `users` up to this many rows, as fast as possible, then run the workload.
    #[arg(long, default_value_t = 0)]
    populate: u64,
    /// Only create the schema (and populate), write no workload.
    #[arg(long)]
    schema_only: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.duration.is_none() && cli.count.is_none() && !cli.schema_only {
        eprintln!("loadgen: give --duration SECONDS or --count N");
        return ExitCode::from(1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("loadgen: stopping");
                    stop.store(true, Ordering::Relaxed);
                }
            });
        }
        if cli.populate > 0 || cli.schema_only {
            match loadgen::populate(&cli.url, cli.populate, cli.seed).await {
                Ok((n, t)) if n > 0 => eprintln!(
                    "loadgen: inserted {n} users in {:.1}s ({:.0} rows/s)",
                    t.as_secs_f64(),
                    n as f64 / t.as_secs_f64().max(1e-9)
                ),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("loadgen: {e:#}");
                    return ExitCode::from(1);
                }
            }
            if cli.schema_only {
                return ExitCode::SUCCESS;
            }
        }
        let options = Options {
            url: cli.url,
            rate: cli.rate,
            duration: cli.duration.map(Duration::from_secs),
            count: cli.count,
            mix: cli.mix,
            tables: cli.tables,
            seed: cli.seed,
            connections: cli.connections,
            txn_size: cli.txn_size,
            progress: true,
        };
        match loadgen::run(options, stop).await {
            Ok(s) => {
                println!(
                    "loadgen: {} changes ({} inserts, {} updates, {} deletes) in {} transactions ({} retried), {:.1}s, {:.0} changes/s; \
                     write latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    s.changes,
                    s.kind(loadgen::Kind::Insert),
                    s.kind(loadgen::Kind::Update),
                    s.kind(loadgen::Kind::Delete),
                    s.transactions,
                    s.retries,
                    s.elapsed.as_secs_f64(),
                    s.rate(),
                    s.percentile(0.5).as_secs_f64() * 1e3,
                    s.percentile(0.99).as_secs_f64() * 1e3,
                    s.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadgen: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}
