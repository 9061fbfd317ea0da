//! The memory allocator of every sluice binary: mimalloc, returning freed memory at once.
//!
//! The daemon allocates and frees many small Arrow buffers per batch: with glibc malloc a
//! third of its CPU in a catch-up profile went to malloc and free (mimalloc: catch-up
//! +15-50%). mimalloc keeps freed pages for a while before returning them (10 ms x 10 in
//! arenas by default), which raised the daemon's peak RSS by 15-35 MB in the benchmark;
//! returning them at once costs no measurable throughput.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v2's `mi_option_t` (include/mimalloc.h); the
/// bindings do not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Call first thing in `main`.
#[allow(unsafe_code)] // FFI: the one call that sets the option
pub fn tune() {
    // SAFETY: mi_option_set only stores an integer option; any value is valid for it.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}
