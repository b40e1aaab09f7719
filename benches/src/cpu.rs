//! CPU time of a group of this process's threads, told apart by their names.
//!
//! A benchmark that serves a coordinator in-process and loads it from the same process runs each on
//! its own tokio runtime ([`runtime`], whose threads all carry the runtime's name), then reads how
//! much CPU the coordinator's threads used over a window ([`threads_cpu`]), without counting the
//! load generator's. On Linux only (`/proc/self/task`).

use std::io;
use std::path::Path;
use std::time::Duration;

/// A multi-threaded tokio runtime with `workers` worker threads, every thread of which (workers and
/// the blocking pool) is named `name` (at most 15 bytes: the kernel's limit). Idle blocking threads
/// are kept for an hour, so that none exits, taking its CPU time with it, inside a window.
pub fn runtime(name: &str, workers: usize) -> io::Result<tokio::runtime::Runtime> {
    assert!(name.len() <= 15, "thread name `{name}` is over 15 bytes");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
}

/// CPU time (user + system) used so far by this process's live threads whose name starts with
/// `prefix`. From each thread's `schedstat` (nanoseconds) where the kernel has it, else from its
/// `stat` (clock ticks, taken as 10 ms).
pub fn threads_cpu(prefix: &str) -> io::Result<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task")? {
        let dir = task?.path();
        // A thread may exit between the listing and the reads: it counts as nothing.
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end().starts_with(prefix) {
            total += thread_cpu(&dir).unwrap_or_default();
        }
    }
    Ok(total)
}

/// CPU time (user + system) used so far by the whole process: every thread, those that have
/// exited included (`CLOCK_PROCESS_CPUTIME_ID`, nanoseconds). Unlike [`threads_cpu`], it counts a
/// thread that lived only inside the window, such as the sender thread an all-reduce starts.
pub fn process_cpu() -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

fn thread_cpu(dir: &Path) -> Option<Duration> {
    if let Ok(schedstat) = std::fs::read_to_string(dir.join("schedstat")) {
        if let Some(ns) = schedstat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
        {
            return Some(Duration::from_nanos(ns));
        }
    }
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // The name (field 2) is in parentheses and may hold spaces: count fields after the last `)`.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn counts_the_named_threads_only() {
        let spin = |name: &str| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(|| {
                    let t = Instant::now();
                    let mut x = 0u64;
                    while t.elapsed() < Duration::from_millis(200) {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                    // Stay alive until read.
                    std::thread::sleep(Duration::from_millis(300));
                    x
                })
                .unwrap()
        };
        let busy = spin("cpu-test-busy");
        std::thread::sleep(Duration::from_millis(250));
        let used = threads_cpu("cpu-test-busy").unwrap();
        let none = threads_cpu("cpu-test-absent").unwrap();
        busy.join().unwrap();
        assert!(used >= Duration::from_millis(50), "{used:?}");
        assert!(used <= Duration::from_millis(1000), "{used:?}");
        assert_eq!(none, Duration::ZERO);
    }
}
