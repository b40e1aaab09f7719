//! The "checkpoint now" signal: trainctl may send `SIGUSR1` to ranks before a planned stop. The
//! handler only sets a static [`AtomicBool`] (the one async-signal-safe thing it needs to do); the
//! training loop polls it at step boundaries.
//!
//! This is the crate's only `unsafe`: installing the handler with `sigaction`.

#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the `SIGUSR1` handler; cleared by whoever acts on it.
static CHECKPOINT_NOW: AtomicBool = AtomicBool::new(false);

extern "C" fn on_checkpoint_signal(_signal: libc::c_int) {
    CHECKPOINT_NOW.store(true, Ordering::SeqCst);
}

/// Installs the `SIGUSR1` handler (replacing the default action, which would kill the process)
/// and returns the flag it sets. `SA_RESTART` keeps blocking socket calls from failing with
/// `EINTR` when the signal arrives mid-collective. Calling it again is harmless.
pub fn install_checkpoint_signal() -> io::Result<&'static AtomicBool> {
    // SAFETY: `sigaction` is given a fully initialised struct whose handler only stores to a
    // static atomic, which is async-signal-safe; the mask is emptied with `sigemptyset` first.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_checkpoint_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(&CHECKPOINT_NOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigusr1_sets_the_flag_instead_of_killing_the_process() {
        let flag = install_checkpoint_signal().unwrap();
        flag.store(false, Ordering::SeqCst);
        // SAFETY: raising a signal whose handler was just installed.
        let rc = unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(rc, 0);
        // `raise` returns after the handler ran in this thread.
        assert!(flag.swap(false, Ordering::SeqCst));
    }
}
