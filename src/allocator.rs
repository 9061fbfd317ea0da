//! The memory allocator of every sluice binary: mimalloc (v2, default options).
//!
//! The daemon allocates and frees many small Arrow buffers per batch: with glibc malloc a
//! third of its CPU in a catch-up profile went to malloc and free (with mimalloc: catch-up
//! +15-50%, the source's snapshot 210k -> 340k rows/s). It holds more memory: peak RSS
//! +15-35 MB in the benchmark. Returning freed pages at once (`purge_delay` 0) would give
//! that back but halves the mapping stage (2.4M -> 0.65M rows/s: pages fault in again),
//! so the defaults stay.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
