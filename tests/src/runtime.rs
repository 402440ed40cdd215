//! The one background tokio runtime the servers and the client share, and condition waits.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

/// The shared runtime (two worker threads), started on first use and kept for the process.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("e2e-rt")
            .enable_all()
            .build()
            .expect("building the e2e tokio runtime")
    })
}

/// Polls `cond` until it holds; panics naming `what` after `timeout`. For convergence tests
/// (a strategy change reaching Envoy): wait for the condition, never sleep a fixed time.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
