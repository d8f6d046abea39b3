//! Our locks across `fork()`. A child inherits each mutex in the state it had
//! at the fork, but not the thread that held it: a lock held by another thread
//! at that moment would stay locked in the child for good, and its first step
//! would hang. So `fork` takes every lock of ours first (waiting for the calls
//! holding them, which hold them briefly), and both processes release them.
//! The children then rebuild what belongs to threads they lack (the pool, the
//! claims of calls in flight), by their pid checks.

use std::any::Any;
use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    /// The guards `prepare` took, on the thread that calls fork.
    static HELD: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// Installs the fork handlers, once per process.
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the process.
        let status = unsafe { libc::pthread_atfork(Some(prepare), Some(release), Some(release)) };
        // Without handlers (ENOMEM) a fork is no worse off than before.
        debug_assert_eq!(status, 0, "pthread_atfork failed");
    });
}

extern "C" fn prepare() {
    // Never more than one of these is held at once elsewhere, so the order
    // cannot deadlock against another thread.
    let guards: Vec<Box<dyn Any>> = vec![
        Box::new(crate::parallel::lock()),
        Box::new(crate::in_flight::lock()),
        Box::new(crate::host_state::lock()),
        Box::new(crate::tensorflow_op::lock()),
    ];
    HELD.with(|held| *held.borrow_mut() = guards);
}

extern "C" fn release() {
    HELD.with(|held| held.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Takes one of our locks, boxed.
    type TakeLock = fn() -> Box<dyn Any>;

    /// Forks while another thread holds the lock `take` takes; the child
    /// takes it and exits 0. Returns whether the child finished within 5 s.
    fn child_takes_the_lock_after_a_fork_while_held(take: TakeLock) -> bool {
        let (locked, is_locked) = mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _guard = take();
            locked.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        is_locked.recv().unwrap();
        // SAFETY: the child only takes a lock and exits, without unwinding.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            drop(take());
            // SAFETY: ends the child at once, running no destructors of the parent's.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        let start = Instant::now();
        let mut status = 0;
        let finished = loop {
            // SAFETY: our child's pid and a status to write.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                break libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            }
            if start.elapsed() > Duration::from_secs(5) {
                // SAFETY: our child, hung: end it and reap it.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        holder.join().unwrap();
        finished
    }

    #[test]
    fn a_fork_while_another_thread_holds_a_lock_leaves_the_child_able_to_take_it() {
        install();
        let locks: [(&str, TakeLock); 4] = [
            ("pool", || Box::new(crate::parallel::lock())),
            ("in flight", || Box::new(crate::in_flight::lock())),
            ("host state", || Box::new(crate::host_state::lock())),
            ("TensorFlow registration", || {
                Box::new(crate::tensorflow_op::lock())
            }),
        ];
        for (name, take) in locks {
            assert!(child_takes_the_lock_after_a_fork_while_held(take), "{name}");
        }
    }
}
