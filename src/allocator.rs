//! The memory allocator of every sluice binary: mimalloc (v2), built without transparent
//! huge pages (the `no_thp` feature).
//!
//! The daemon allocates and frees many small Arrow buffers per batch: with glibc malloc a
//! third of its CPU in a catch-up profile went to malloc and free (with mimalloc: catch-up
//! +15-50%, the source's snapshot 210k -> 340k rows/s).
//!
//! Freed memory: mimalloc hands freed pages back to the system after `purge_delay` ms
//! (10 by default), but every further free in the same segment before then pushes the
//! deadline out by `purge_extend_delay` (1 ms), so a busy pipeline, freeing Arrow buffers
//! thousands of times a second, kept 10-15 MB of freed pages resident. [`configure`] sets
//! the delay to [`PURGE_DELAY_MS`] (a `MIMALLOC_PURGE_DELAY` in the environment wins).
//! Three-sink catch-up (500,000 changes, same binary, runs alternating): peak RSS 87.6 /
//! 88.6 MB at 10 ms, 78.7 / 81.7 MB at 1 ms, 74.6 at 0; 33-43k events/s each way. Purging
//! at once (0) is what costs: every free of a last block in a page calls `madvise`, and the
//! mapping stage fell from 1.75M to 1.08M rows/s, the Parquet sink alone from 578k to
//! 347k; at 1 ms they ran at 1.93M and 585k.
//!
//! Huge pages: by default mimalloc asks for transparent huge pages on its arenas
//! (`madvise(MADV_HUGEPAGE)`), and Linux then backs each touched 2 MiB of them with a
//! whole huge page, resident until all of it is free. That was most of what mimalloc cost
//! over glibc in memory: 14-55 MB of `AnonHugePages` in the benchmark's snapshots, peak
//! RSS 83 / 102 / 105 MB (PostgreSQL / MariaDB / Parquet sink) and 130 MB for three sinks
//! with them, 63 / 86 / 78 and 99 MB without; throughput moved within the runs' 15-20%
//! noise (a cost of a few percent is possible, not shown). On a host whose
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `always` the kernel uses huge pages
//! without being asked; there, run the daemon with `MIMALLOC_ALLOW_THP=0` (mimalloc then
//! turns them off for the process).
//!
//! glibc's malloc still serves C code: librdkafka (the Kafka transport) and its
//! compression libraries. It gives each thread that allocates an arena of its own (up to
//! eight per core), and librdkafka's threads free messages another thread allocated, so
//! arenas fill with freed, unreturned memory. [`configure`] leaves glibc one arena,
//! as `MALLOC_ARENA_MAX=1` does (a value set in the environment wins). Kafka snapshot peak
//! RSS (PostgreSQL / MariaDB / Parquet sink, producer queue 4 MB): 92 / 110 / 104 MB with
//! two arenas, 81 / 101 / 88 with one, at the same rate (2.0-2.7k rows/s into tansu). What
//! one arena's lock costs against a fast Kafka cluster is not measured.
//!
//! Even one arena keeps what librdkafka freed: glibc returns memory to the system only
//! from the top of its heap, and its mmap threshold rises whenever a large block is freed,
//! so later fetch buffers (the consumers' decompressed message sets, 32 MB of glibc's
//! 42 MB peak in a three-sink catch-up under heaptrack) come from the heap and stay
//! resident once freed. `malloc_trim` (every free page back to the system), called once
//! in such a catch-up, took RSS from 116 to 86 MB. [`trim_c_heap`] calls it every
//! [`TRIM_EVERY`] on a thread of its own (a walk of a heap of a few MB under the arena's
//! lock): the catch-up then runs at 87-104 MB instead of 118-130, at the same rate. Its
//! peak was still 123-136 MB: when the consumers start, each decompresses whole fetch
//! responses at once (30-45 MB of glibc heap within a second), which neither the consumer
//! queue size nor `queued.min.messages` bounds; the fetch size does (the consumer's
//! `FETCH_BYTES`, 256 KB: peak 97-101 MB).
//!
//! `sluice` and `sluice-bench` call [`configure`] first in `main`, before any thread starts.

use std::ffi::c_long;
use std::time::Duration;

/// How often [`trim_c_heap`] returns glibc's free pages.
pub const TRIM_EVERY: Duration = Duration::from_secs(1);

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed pages before it returns them to the system, in ms (see
/// the module documentation).
pub const PURGE_DELAY_MS: c_long = 1;

/// mimalloc v2's `mi_option_purge_delay`: the Rust bindings name only the options that
/// keep their number across versions (a test checks this one against the linked library).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets up both allocators for a long-running process (see the module documentation).
/// Call first in `main`, before any thread starts.
pub fn configure() {
    purge_promptly();
    limit_c_arenas();
}

fn purge_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, a plain value it reads on each purge;
        // called before any other thread exists.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

/// Leaves glibc's malloc one arena (see the module documentation).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_c_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets a parameter of glibc's allocator; no memory is touched.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Starts a thread that returns glibc's free pages to the system every [`TRIM_EVERY`]
/// (see the module documentation), for the life of the process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_c_heap() -> std::io::Result<()> {
    std::thread::Builder::new().name("malloc-trim".into()).spawn(|| {
        loop {
            std::thread::sleep(TRIM_EVERY);
            // SAFETY: malloc_trim only hands free pages of glibc's heap back to the system.
            #[allow(unsafe_code)]
            unsafe {
                libc::malloc_trim(0);
            }
        }
    })?;
    Ok(())
}

/// Other C libraries: their allocator as it is.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_c_arenas() {}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_c_heap() -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Option numbers are positions in mimalloc's `mi_option_t`: this one must still be the
    /// purge delay of the library linked (mimalloc v2, default 10 ms).
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads mimalloc's version and one option.
        let (version, delay) =
            unsafe { (libmimalloc_sys::mi_version(), libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)) };
        assert!((20_000..30_000).contains(&version), "mimalloc {version} is not v2");
        // A delay from the environment is the option's value and is left as it is.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(delay, 10, "option {MI_OPTION_PURGE_DELAY} is not purge_delay");
            purge_promptly();
            // SAFETY: as above.
            let set = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            assert_eq!(set, PURGE_DELAY_MS);
        }
    }
}
